"""The settings of a turn: one type, one list of keys, validated once, stored the same way by
every front end (the CLI, the chat, the server).

A conversation keeps its settings in the history store: `stored()` in its settings column,
`system` and `thinking` in their own. An answer keeps `record(...)`: the same keys, resolved
(the checkpoint's defaults filled in), plus the model that wrote it, so its details read the
same whoever produced it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:
    from .config import GenerationConfig
    from .sampling import SamplingParams
    from .store import Conversation

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
STORED_KEYS = (*SAMPLING_KEYS, "max_tokens", "stop")  # a conversation's settings column


@dataclass(frozen=True)
class TurnSettings:
    """What the next answer uses. None means "the checkpoint's default" (its
    generation_config.json, else the model card's temperature 0.8 / top-p 0.9)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    system: str | None = None
    thinking: bool = False

    def __post_init__(self) -> None:
        from .sampling import SamplingParams

        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise UsageError("stop strings must be a list of non-empty texts")
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise UsageError("max tokens must be a whole number, at least 1")
        if self.system is not None and not isinstance(self.system, str):
            raise UsageError("the system prompt must be text")
        try:
            SamplingParams(**{k: v for k, v in self.sampling().items() if v is not None})
        except TypeError as e:  # a value of the wrong kind (text where a number belongs)
            raise UsageError(f"a sampling setting has the wrong type ({e})") from None

    def sampling(self) -> dict[str, Any]:
        """The sampling overrides, as `SamplingParams.from_defaults` takes them."""
        return {k: getattr(self, k) for k in SAMPLING_KEYS}

    def params(self, generation: GenerationConfig) -> SamplingParams:
        """The sampling to use: these settings over the checkpoint's defaults."""
        from .sampling import SamplingParams

        return SamplingParams.from_defaults(generation, **self.sampling())

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stop": list(self.stop)}

    def stored(self) -> dict[str, Any]:
        """A conversation's settings column (system and thinking have columns of their own)."""
        return {k: v for k, v in self.as_dict().items() if k in STORED_KEYS}

    def record(self, params: SamplingParams, max_tokens: int, model: str, revision: str | None
               ) -> dict[str, Any]:  # fmt: skip
        """An answer's settings: what it was really generated with, and by which model."""
        return {
            **self.as_dict(),
            **asdict(params),
            "max_tokens": max_tokens,
            "model": model,
            "revision": revision,
        }

    def with_(self, **changes: Any) -> TurnSettings:
        return replace(self, **changes)

    def merged(self, **overrides: Any) -> TurnSettings:
        """These settings with every override that is given (None or () means not given)."""
        given = {k: v for k, v in overrides.items() if v is not None and v != ()}
        return replace(self, **given)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TurnSettings:
        """Settings from a stored dict; unknown keys (an answer's record, newer versions) are
        left out. UsageError when a value does not validate."""
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in (data or {}).items() if k in names}
        if "stop" in known:
            known["stop"] = tuple(known["stop"] or ())
        return cls(**known)

    @classmethod
    def of(cls, conversation: Conversation) -> TurnSettings:
        """A stored conversation's settings."""
        return cls.from_dict(
            {**conversation.settings, "system": conversation.system,
             "thinking": conversation.thinking}
        )  # fmt: skip
