"""The model thread's batching of streamed text (app/worker.py `Batch`): a fast model's chunks
reach the UI as fewer messages carrying the same text in the same order, with how many chunks
each one holds (the live tok/s counts them); a model slower than the interval streams chunk by
chunk; answer text and thoughts never merge."""

from __future__ import annotations

import pytest

pytest.importorskip("textual")

from apertus_mlx_app.worker import AnswerChunk, AnswerThought, Batch  # noqa: E402


def shown(posted: list) -> list[tuple[str, str, int | None]]:
    return [(type(m).__name__, m.text, getattr(m, "tokens", None)) for m in posted]


def test_chunks_within_the_interval_are_held_and_posted_together():
    posted: list = []
    batch = Batch(posted.append, job=7, interval=3600.0)
    batch.add(AnswerChunk, "Grüezi")  # the first one goes out at once: nothing came before
    for text in (" mit", "en", "and", "!"):
        batch.add(AnswerChunk, text)
    assert shown(posted) == [("AnswerChunk", "Grüezi", 1)]
    batch.flush()
    assert shown(posted) == [("AnswerChunk", "Grüezi", 1), ("AnswerChunk", " mitenand!", 4)]
    assert all(m.job == 7 for m in posted)
    batch.flush()  # nothing held: nothing posted
    assert len(posted) == 2


def test_a_slow_model_streams_chunk_by_chunk():
    posted: list = []
    batch = Batch(posted.append, job=1, interval=0.0)
    for text in ("a", "b", "c"):
        batch.add(AnswerChunk, text)
    assert shown(posted) == [("AnswerChunk", t, 1) for t in "abc"]


def test_thoughts_and_answer_text_are_posted_apart_in_order():
    posted: list = []
    batch = Batch(posted.append, job=1, interval=3600.0)
    batch.add(AnswerThought, "Let")
    batch.add(AnswerThought, " me think.")
    batch.add(AnswerChunk, "Hi")
    batch.add(AnswerChunk, "!")
    batch.flush()
    assert shown(posted) == [
        ("AnswerThought", "Let", None),
        ("AnswerThought", " me think.", None),
        ("AnswerChunk", "Hi!", 2),
    ]
