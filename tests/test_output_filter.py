"""The output filter as a library: format, matching, streaming; `filter` CLI in test_filter_cli."""

from __future__ import annotations

import json
import re
import unicodedata
from datetime import date, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apertus_mlx.errors import FilterFormatError
from apertus_mlx.filter_format import parse_json, read_filter, write_compiled
from apertus_mlx.output_filter import (
    MARKER,
    PATTERN_WINDOW,
    OutputFilter,
    phrase_digest,
    reminder,
    words,
)


def filter_doc(phrases, max_words=3, patterns=(), published="2026-01-01", **extra) -> dict:
    doc = {
        "version": 1,
        "published": published,
        "algorithm": "sha256",
        "normalization": "nfkc-casefold-words",
        "max_words": max_words,
        "entries": [phrase_digest(p) for p in phrases],
        **extra,
    }
    if patterns:
        doc["patterns"] = list(patterns)
    return doc


def make(phrases, **kw) -> OutputFilter:
    return OutputFilter(parse_json(json.dumps(filter_doc(phrases, **kw))))


# --- format --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"algorithm": "md5"}, "unknown algorithm 'md5'"),
        ({"normalization": "nfc"}, "unknown normalization"),
        ({"entries": ["ab" * 31]}, "entries[0] is not a 64-digit hex sha256 digest"),
        ({"entries": [phrase_digest("a"), "zz" * 32]}, "entries[1] is not a 64-digit hex"),
        ({"entries": [phrase_digest("a"), 7]}, "entries[1] is not"),
        ({"entries": "abc"}, "entries must be a list"),
        ({"published": "last spring"}, "published must be a date"),
        ({"max_words": 0}, "max_words must be a whole number 1-16"),
        ({"max_words": "3"}, "max_words must be"),
        ({"patterns": ["(unclosed"]}, "patterns[0] is not a regular expression"),
        ({"patterns": "x"}, "patterns must be a list"),
        # what RE2 cannot run in linear time is refused at install, said as such
        ({"patterns": ["ok", r"(?<=\+)\d\d"]}, "patterns[1] uses look-behind"),
        ({"patterns": [r"\d(?!x)"]}, "patterns[0] uses look-ahead"),
        ({"patterns": [r"(a)\1"]}, "patterns[0] uses a backreference"),
        ({"patterns": [r"(?P<n>a)(?P=n)"]}, "patterns[0] uses a backreference"),
        ({"patterns": ["\ud800"]}, "lone surrogate"),
        ({"version": "v\udcff"}, "lone surrogate"),
    ],
)
def test_format_errors_are_one_line_naming_the_problem(change, message):
    doc = {**filter_doc(["Anna Muster"]), **change}
    with pytest.raises(FilterFormatError) as e:
        parse_json(json.dumps(doc), "f.json")
    assert message in str(e.value) and str(e.value).startswith("f.json")
    assert "\n" not in str(e.value)


def test_json_nested_too_deeply_is_one_line():
    deep = b'{"version": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(FilterFormatError, match="nested too deeply"):
        parse_json(deep, "f.json")


@pytest.mark.parametrize("kind", ["char-device", "fifo", "directory", "too-big"])
def test_only_regular_files_of_bounded_size_are_read(tmp_path, kind, monkeypatch):
    """/dev/zero would be read without end, a FIFO would wait for a writer forever."""
    import os

    import apertus_mlx.filter_format as ff

    path = tmp_path / "f"
    if kind == "char-device":
        path = "/dev/zero"
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_text(json.dumps(filter_doc(["a"])))
        monkeypatch.setattr(ff, "MAX_FILE_BYTES", 100)
    expected = "larger than" if kind == "too-big" else "not a regular file|Is a directory"
    with pytest.raises(FilterFormatError, match=expected):
        read_filter(path)


def test_missing_fields_and_bad_json():
    doc = filter_doc(["x"])
    del doc["entries"], doc["published"]
    with pytest.raises(FilterFormatError, match="missing field.*published, entries"):
        parse_json(json.dumps(doc))
    with pytest.raises(FilterFormatError, match="not valid JSON"):
        parse_json(b'{"version": 1,')
    with pytest.raises(FilterFormatError, match="expected a JSON object"):
        parse_json(b"[1, 2]")


def test_digests_are_sorted_deduplicated_and_survive_the_installed_form(tmp_path):
    phrases = [f"person {i}" for i in range(300)]
    doc = filter_doc(phrases + phrases[:10])
    doc["entries"][0] = doc["entries"][0].upper()  # hex case does not matter
    src = tmp_path / "f.json"
    src.write_text(json.dumps(doc))
    data = read_filter(src)
    assert data.entries == 300
    chunks = [data.digests[i : i + 32] for i in range(0, len(data.digests), 32)]
    assert chunks == sorted(set(chunks))
    write_compiled(data, tmp_path / "installed.bin")
    again = read_filter(tmp_path / "installed.bin")
    assert again == data
    f = OutputFilter(again)
    assert all(f.apply(p) == MARKER for p in phrases)
    assert f.apply("person 300") == "person 300"


def test_a_truncated_installed_filter_is_refused(tmp_path):
    write_compiled(parse_json(json.dumps(filter_doc(["a", "b"]))), tmp_path / "f.bin")
    raw = (tmp_path / "f.bin").read_bytes()
    (tmp_path / "f.bin").write_bytes(raw[:-5])
    with pytest.raises(FilterFormatError, match="truncated; install it again"):
        read_filter(tmp_path / "f.bin")


# --- matching ------------------------------------------------------------------------------


def test_matches_across_case_punctuation_and_unicode_forms():
    f = make(["Zürich", "Anna Muster"])
    assert f.apply("ZU\u0308RICH") == MARKER  # decomposed, upper case
    assert f.apply("Zu\u0308rich.") == MARKER + "."
    assert f.apply("\uff3a\u00fcrich") == MARKER  # fullwidth Z (NFKC)
    assert f.apply("Hi anna-MUSTER, hi ANNA\n  muster!") == f"Hi {MARKER}, hi {MARKER}!"
    # whole words only
    assert f.apply("Zürichsee annamuster Annas Muster") == "Zürichsee annamuster Annas Muster"


def test_longest_match_wins_and_case_folding_expands():
    f = make(["Anna", "Anna Muster Strasse", "Straße"])
    assert f.apply("Anna Muster Strasse 5") == f"{MARKER} 5"
    assert f.apply("Anna Muster") == f"{MARKER} Muster"
    assert f.apply("STRASSE") == MARKER  # casefold: ß -> ss
    assert words("Ａｎｎａ, MÜSTER_x!") == ["anna", "müster_x"]
    assert words("हिन्दी भाषा") == ["हिन्दी", "भाषा"]  # vowel signs and virama stay in the word


def test_patterns_replace_local_rules():
    f = make([], patterns=[r"[\w.+-]+@[\w-]+\.[a-z]{2,}", r"\+41(?: ?\d){9}\b", "(?i)ch\\d{2}"])
    text = "Write to anna.muster@example.ch or call +41 44 123 45 67 today, Ch93 or x."
    assert f.apply(text) == f"Write to {MARKER} or call {MARKER} today, {MARKER} or x."
    assert make([], patterns=["x*"]).apply("abc") == "abc"  # empty matches are no matches


@pytest.mark.parametrize(
    "pattern, text, expected",
    [
        ("(a+)+$", "a" * 30 + "!", "a" * 30 + "!"),  # Python's re: hours
        ("(x+x+)+y", "x" * 40, "x" * 40),  # Python's re: about a minute
        ("(.|.)*\x01", "y" * 200, "y" * 200),
        ("(.|.)*\x01", "zz\x01", MARKER),
    ],
)
def test_patterns_that_backtrack_for_ages_in_re_are_linear_here(pattern, text, expected):
    """RE2 decides these in time linear in the 64-character window; with Python's `re` each
    call never returns in practice (this test then hangs, which is the bug it guards)."""
    assert make([], patterns=[pattern]).apply(text) == expected


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet="ab1 @x", max_size=2 * PATTERN_WINDOW),
    # patterns that match at the same places with different lengths, so order decides
    st.lists(
        st.sampled_from(["a", "ab", "a+", "a+b?", "(?i)AB+", "a|ab", "x*", "b*$", r"\bab\b"]),
        min_size=2,
        max_size=4,
        unique=True,
    ),
)
def test_the_patterns_as_one_alternation_match_as_the_patterns_one_by_one(text, patterns):
    """One RE2 call a position (the alternation) finds what trying each pattern in file
    order finds, empty matches included (they fall back to the loop)."""
    f = make([], patterns=patterns)
    assert f._any_pattern is not None
    one_by_one = make([], patterns=patterns)
    one_by_one._any_pattern = None
    assert f.apply(text) == one_by_one.apply(text)


def test_a_lone_surrogate_in_the_text_does_not_stop_the_patterns():
    f = make([], patterns=[r"\d{4}"])
    assert f.apply("bad \udcff byte, 1999") == f"bad \udcff byte, {MARKER}"


def test_default_stream_is_reset_by_flush():
    f = make(["Anna Muster"])
    assert f.feed("Anna") == ""
    assert f.flush() == "Anna"
    assert f.feed("Muster") == ""  # a new answer: "Anna" is gone
    assert f.flush() == "Muster"


# --- streaming -----------------------------------------------------------------------------

VOCAB = ["Anna", "Muster", "Zürich", "ZU\u0308RICH", "Bern", "x", "½", "ß", "SS", "ﬁ", "the"]
PHRASES = ["Anna Muster", "Zürich", "Bern Zürich Bern", "x x", "2", "ss", "fi the"]
SEPS = [" ", ", ", "-", "\n", "", ".", "\u0308", "  "]


def reference(text: str, phrases: list[str], max_words: int) -> str:
    """Filter the whole text the plain way: find words, compare normalized phrases, no hashing."""
    wanted = {" ".join(words(p)) for p in phrases}
    spans = [
        (m.start(), m.end(), " ".join(words(m.group())))
        for m in re.finditer(r"(?:\w[\u0300-\u036f]*)+", text)
    ]
    out, at, i = [], 0, 0
    while i < len(spans):
        for k in range(min(max_words, len(spans) - i), 0, -1):
            if " ".join(w for _, _, w in spans[i : i + k]) in wanted:
                out += [text[at : spans[i][0]], MARKER]
                at = spans[i + k - 1][1]
                i += k
                break
        else:
            i += 1
    return "".join(out) + text[at:]


texts = st.lists(st.tuples(st.sampled_from(VOCAB), st.sampled_from(SEPS)), max_size=25).map(
    lambda parts: "".join(w + s for w, s in parts)
)


def cut(text: str, points: list[int]) -> list[str]:
    points = sorted({p % (len(text) + 1) for p in points})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]


@settings(max_examples=300, deadline=None)
@given(texts, st.lists(st.integers(min_value=0), max_size=30), st.integers(1, 4))
def test_streaming_equals_the_whole_text_for_any_cuts(text, points, max_words):
    f = make(PHRASES, max_words=max_words)
    whole = f.apply(text)
    s, shown = f.stream(), ""
    for chunk in cut(text, points):
        shown += s.feed(chunk)
        assert whole.startswith(shown)  # nothing shown is ever taken back (no match prefix)
    assert shown + s.flush() == whole


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=60),
    st.lists(st.integers(min_value=0), max_size=20),
    st.lists(st.integers(min_value=0), min_size=1, max_size=4),
)
def test_any_unicode_streams_like_the_whole_text(text, points, picks):
    # entries made of the text's own words and word pairs, so that something matches
    said = words(text) or ["x"]
    phrases = [said[i % len(said)] for i in picks]
    phrases.append(" ".join(said[:2]))
    f = make(phrases, max_words=2)
    whole = f.apply(text)
    s, shown = f.stream(), ""
    for chunk in cut(text, points):
        shown += s.feed(chunk)
        assert whole.startswith(shown)
    assert shown + s.flush() == whole
    assert not set(phrases) & set(words(whole.replace(MARKER, " ")))


@settings(max_examples=300, deadline=None)
@given(texts)
def test_whole_text_agrees_with_a_plain_reference(text):
    # ½ and the lone combining mark make clusters that are half word, half not: skip them here
    text = text.replace("½", "").replace("\u0308", "")
    assert make(PHRASES, max_words=3).apply(text) == reference(text, PHRASES, 3)


def test_holds_back_at_most_max_words_words():
    f = make(["Anna Muster Bern"], max_words=3)
    s = f.stream()
    out = "".join(s.feed(w + " ") for w in ["one", "two", "three", "four", "five"])
    # "three four five " may still start "Anna Muster Bern"-like phrase: held, nothing more
    # (the last character waits for the next one: a combining mark could still change it)
    assert out == "one two "
    assert s.feed("s") == "three "
    assert s.flush() == "four five s"


@settings(max_examples=150, deadline=None)
@given(
    st.text(alphabet="ab 0123456789+@.-", max_size=3 * PATTERN_WINDOW),
    st.lists(st.integers(min_value=0), max_size=20),
)
def test_patterns_stream_like_the_whole_text(text, points):
    f = make(["ab"], max_words=2, patterns=[r"\b\d{3,}\b", r"a+@b+", r"\+\d\d"])
    whole = f.apply(text)
    s, shown = f.stream(), ""
    for chunk in cut(text, points):
        shown += s.feed(chunk)
        assert whole.startswith(shown)
    assert shown + s.flush() == whole


def test_nfkc_per_character_cluster_matches_whole_string_nfkc_on_common_text():
    text = "Grüezi ZU\u0308RICH, Ｆｕｌｌ ﬁle Straße ½"
    assert " ".join(words(text)) == " ".join(
        re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold())
    )


# --- the event wrapper ---------------------------------------------------------------------


def events(texts_, tokens=None):
    from apertus_mlx.generate import Chunk, Done, Stats

    tokens = tokens or list(range(len(texts_)))
    for t, tok in zip(texts_, tokens):
        yield Chunk(t, tok)
    yield Done("".join(texts_), Stats(generated_tokens=len(tokens)), tokens)


def test_filtered_events_hide_the_match_and_drop_the_token_ids():
    from apertus_mlx.generate import Chunk, Done
    from apertus_mlx.output_filter import filtered

    out = list(filtered(events(["Call An", "na Mus", "ter now", "."]), make(["Anna Muster"])))
    chunks = [e for e in out if isinstance(e, Chunk)]
    done = out[-1]
    assert isinstance(done, Done)
    assert "".join(c.text for c in chunks) == done.text == f"Call {MARKER} now."
    assert all("Anna"[:2] not in c.text for c in chunks)
    assert done.tokens == []  # the ids would decode back to "Anna Muster"
    assert {c.token for c in chunks} == {-1}  # a chunk's id may be of text removed later
    clean = list(filtered(events(["nothing ", "here"]), make(["Anna Muster"])))
    assert clean[-1].text == "nothing here" and clean[-1].tokens == [0, 1]


def test_ctrl_c_thrown_into_the_wrapper_reaches_the_generator():
    from apertus_mlx.generate import Chunk, Done, Stats
    from apertus_mlx.output_filter import filtered

    def source():
        try:
            yield Chunk("Anna, ", 1)
            yield Chunk("Muster and more", 2)
        except KeyboardInterrupt:
            yield Chunk(" (stopped)", -1)
            yield Done("Anna,  (stopped)", Stats(finish_reason="interrupted"), [1])

    wrapped = filtered(source(), make(["Anna"], max_words=1))
    assert next(wrapped).text == MARKER + ","  # the space waits for the next character
    rest = [wrapped.throw(KeyboardInterrupt()), *wrapped]
    assert rest[-1].stats.finish_reason == "interrupted"
    assert rest[-1].text == f"{MARKER},  (stopped)" and rest[-1].tokens == []


def test_ctrl_c_while_the_filter_works_ends_the_answer_as_interrupted(monkeypatch):
    """A SIGINT that arrives inside the filter's own work waits until that chunk is filtered,
    then reaches the generator, which ends the answer: stored as interrupted, with its text.
    (Before, it left the wrapper dead mid-chunk and the answer was stored empty, "error".)"""
    import signal

    import apertus_mlx.output_filter as of
    from apertus_mlx.generate import Chunk, Done, Stats, wind_down
    from apertus_mlx.output_filter import filtered

    def source():
        try:
            yield Chunk("first words ", 1)
            yield Chunk("and more ", 2)
            yield Chunk("never", 3)
        except KeyboardInterrupt:
            yield Done("first words and more ", Stats(finish_reason="interrupted"), [1, 2])

    real_feed = of.FilterStream.feed

    def feed_with_a_signal(self, chunk):
        if chunk == "and more ":
            signal.raise_signal(signal.SIGINT)  # Ctrl+C now, in the middle of the work
        return real_feed(self, chunk)

    monkeypatch.setattr(of.FilterStream, "feed", feed_with_a_signal)
    wrapped = filtered(source(), make(["nobody"], max_words=1))
    got = []
    try:
        for event in wrapped:  # as `generate` consumes it
            got.append(event)
    except KeyboardInterrupt:
        got.extend(wind_down(wrapped))
    done = got[-1]
    assert isinstance(done, Done) and done.stats.finish_reason == "interrupted"
    assert done.text == "first words and more "
    assert "".join(e.text for e in got if isinstance(e, Chunk)) == done.text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


# --- the reminder --------------------------------------------------------------------------


def test_reminder_when_missing_or_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("APERTUS_MLX_HOME", str(tmp_path))
    assert "no output filter installed" in reminder()
    assert "huggingface.co/swiss-ai" in reminder()
    published = date(2026, 1, 1)
    data = parse_json(json.dumps(filter_doc(["a"], published=published.isoformat())))
    write_compiled(data, tmp_path / "output-filter.bin")
    assert reminder(today=published + timedelta(days=30)) is None
    old = reminder(today=published + timedelta(days=200))
    assert "200 days old" in old and "every six months" in old
    assert OutputFilter.installed().data == data
