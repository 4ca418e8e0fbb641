"""A small tokenizer laid out like Apertus's: same pre-tokenizer, special tokens at their real ids.

Trained in a second or two on a built-in multilingual corpus, so tests need no network.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from apertus_mlx.chat_template import APERTUS_TEMPLATE

# The split pattern of Apertus's tokenizer.json (Mistral-Nemo's "tekken" one).
APERTUS_SPLIT_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_PR_TOKENS = [
    "<pr>",
    "<pr_status>",
    "<pr_is_merged>",
    "<pr_base>",
    "<pr_file>",
    "<pr_base_code>",
    "<pr_diff>",
    "<pr_diff_hunk>",
    "<pr_comment>",
    "<pr_event_id>",
    "<pr_review>",
    "<pr_review_state>",
    "<pr_review_comment>",
    "<pr_in_reply_to_review_id>",
    "<pr_in_reply_to_comment_id>",
    "<pr_diff_hunk_comment_line>",
]

# id -> token for the Apertus 2509 control range, as in the published tokenizer.json.
_LISTED = {
    0: "<unk>",
    1: "<s>",
    2: "</s>",
    3: "<pad>",
    14: "\\begin{",
    15: "\\end{",
    16: "\\text{",
    17: "\\boxed{",
    **dict(
        enumerate(
            [
                "<filename>",
                "<gh_stars>",
                "<issue_start>",
                "<issue_comment>",
                "<issue_closed>",
                "<jupyter_start>",
                "<jupyter_text>",
                "<jupyter_code>",
                "<jupyter_output>",
                "<empty_output>",
                "<commit_before>",
                "<commit_msg>",
                "<commit_after>",
                "<reponame>",
                "<think>",
                "</think>",
                "<answer>",
                "</answer>",
                "<iban-pii>",
                "<email-pii>",
                "<ip-pii>",
                "<file_sep>",
                "<code_to_intermediate>",
                "<intermediate_to_code>",
                *_PR_TOKENS,
                "<|fim_begin|>",
                "<|fim_hole|>",
                "<|fim_end|>",
                "<|system_start|>",
                "<|system_end|>",
                "<|developer_start|>",
                "<|developer_end|>",
                "<|user_start|>",
                "<|user_end|>",
                "<|assistant_start|>",
                "<|assistant_end|>",
                "<|inner_prefix|>",
                "<|inner_suffix|>",
                "<|tools_prefix|>",
                "<|tools_suffix|>",
            ],
            start=18,
        )
    ),
}
NON_SPECIAL_IDS = range(14, 18)  # the LaTeX openers take part in normal tokenization
FIRST_BPE_ID = 128  # real Apertus: 1000; smaller here so the fixture vocabulary stays small
VOCAB_SIZE = 1500

CONTROL_TOKENS = [_LISTED.get(i, f"<SPECIAL_{i}>") for i in range(FIRST_BPE_ID)]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Machine learning models run on your own Mac.",
    "Hello, how are you today? I'd like to know the weather in Zurich, Geneva and Lugano.",
    "Grüezi mitenand! Wie gaht's dir hüt? Mir gönd am Sunntig uf de Üetliberg go wandere.",
    "Chuchichäschtli, Müesli, Rüebli und es Stückli Chäs: das isch typisch schwiizerdütsch.",
    "Bonjour à tous ! Où est la gare ? Je voudrais un café crème et un croissant, s'il vous plaît.",
    "L'été dernier, nous sommes allés à Genève ; c'était très agréable, n'est-ce pas ?",
    "Buongiorno! Come stai? Vorrei un caffè e una brioche. Perché la città è così bella?",
    "Allegra! Co vai? Jau sun da Scuol e discur rumantsch. Grazia fitg per tia agid.",
    "Bun di! Il rumantsch grischun è ina lingua naziunala da la Svizra.",
    "你好，世界！我们今天去苏黎世湖散步。机器学习模型可以在电脑上运行。后汉书是一部史书。",
    "こんにちは、世界！今日はいい天気ですね。東京とチューリッヒは遠いです。カタカナとひらがな。",
    "مرحبا بالعالم! كيف حالك اليوم؟ أنا أتعلم اللغة العربية في سويسرا.",
    "नमस्ते दुनिया! आप कैसे हैं? मैं स्विट्ज़रलैंड में हिंदी सीख रहा हूँ।",
    "Emoji: 😀 😃 🇨🇭 👍🏽 🚀 ❤️ 🧀 🏔️ 👨‍👩‍👧‍👦 ✨",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    'for (int i = 0; i < 10; i++) { printf("%d\\n", i); }\n',
    '{"name": "get_weather", "arguments": {"location": "Bern", "unit": "celsius"}}',
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 2024-04 3.14159 1,000,000",
    "\\begin{equation} E = mc^2 \\end{equation} \\text{and} \\boxed{42}",
    "CamelCaseWords and snake_case_words and UPPERCASE and MixedCASEtokens.",
    "\t tabs\tand  double  spaces\r\nwindows line\r\n\n\nblank lines   trailing  ",
    "Switzerland has four national languages: German, French, Italian and Romansh.",
    "The assistant answers questions, writes code, translates text and explains its reasoning.",
    "Die Schweiz ist ein Binnenstaat in Mitteleuropa. Zürich, Basel und Bern sind grosse Städte.",
    "La Suisse est un pays d'Europe centrale. Les Alpes couvrent une grande partie du territoire.",
    "La Svizzera confina con l'Italia, la Francia, la Germania, l'Austria e il Liechtenstein.",
    "瑞士位于欧洲中部，是一个多语言国家。阿尔卑斯山风景优美，湖泊清澈。",
    "スイスは中央ヨーロッパにある国です。アルプス山脈と湖がとても美しいです。",
    "سويسرا دولة في وسط أوروبا، وتشتهر بجبال الألب والشوكولاتة والساعات.",
    "स्विट्ज़रलैंड मध्य यूरोप में एक देश है। आल्प्स पर्वत बहुत सुंदर हैं।",
    "import numpy as np\nx = np.arange(10)\nprint(x.sum(), x.mean())\n",
    "class Model(nn.Module):\n    def __call__(self, x):\n        return self.proj(x) * 2\n",
    "SELECT name, COUNT(*) FROM users WHERE age > 18 GROUP BY name ORDER BY 2 DESC;",
]


# Short texts in every script the corpus covers, for encode/decode/streaming tests.
SAMPLE_TEXTS = [
    "Hello, world! How are you today?",
    "Grüezi mitenand, wie gaht's? Chuchichäschtli.",
    "Où est la gare ? L'été à Genève.",
    "Perché la città è così bella?",
    "Allegra! Jau discur rumantsch.",
    "你好，世界！后汉书",
    "こんにちは、世界！カタカナ",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Emoji 😀🇨🇭👨‍👩‍👧‍👦 ✨",
    "def f(x):\n    return x * 2  # code\n\n",
    "\\begin{equation} x \\end{equation}",
    "  leading and trailing spaces  \r\n",
]


def _train(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(byte_fallback=False, fuse_unk=False, ignore_merges=True))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(APERTUS_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=CONTROL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def build_tokenizer(out_dir: Path, with_template: bool = True) -> int:
    """Write tokenizer.json, tokenizer_config.json (and chat_template.jinja); return vocab size."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = json.loads(_train(VOCAB_SIZE).to_str())
    for entry in spec["added_tokens"]:
        if entry["id"] in NON_SPECIAL_IDS:
            entry["special"] = False
    assert all(spec["model"]["vocab"][t] == i for i, t in enumerate(CONTROL_TOKENS))
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), "utf-8")
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 65536,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), "utf-8")
    if with_template:
        (out_dir / "chat_template.jinja").write_text(APERTUS_TEMPLATE.strip() + "\n", "utf-8")
    return len(spec["model"]["vocab"])
