"""The chat's own config.json, damaged in every way a file can be: the app starts on defaults
and says so (`AppConfig.load` raises one UsageError, which the app shows as a notification)."""

from __future__ import annotations

import pytest

pytest.importorskip("textual")

from apertus_mlx_app.app import ChatApp  # noqa: E402
from apertus_mlx_app.settings import MAX_CONFIG_BYTES, AppConfig, ChatSettings  # noqa: E402

from apertus_mlx.errors import UsageError  # noqa: E402
from tests.test_app import SIZE, wait_for  # noqa: E402

pytestmark = pytest.mark.anyio

DAMAGED = {
    "nested-200k": ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
    "object-nested-200k": ('{"":' * 200_000 + "1" + "}" * 200_000, "nested too deeply"),
    "huge": (" " * (MAX_CONFIG_BYTES + 1) + "{}", "larger than"),
    "not-an-object": ("[1, 2]", "expected a JSON object"),
    "model-not-a-name": ('{"last_model": [1]}', "last_model must be a model name"),
    "not-utf8": (b"\xff\xfe{}", "cannot read"),
    "garbage": ("{not json", "cannot read"),
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("APERTUS_MLX_HOME", str(tmp_path / "home"))
    path = AppConfig.path()
    path.parent.mkdir(parents=True)
    return path


@pytest.mark.parametrize("name", list(DAMAGED))
def test_a_damaged_config_is_one_usage_error(config, name):
    content, message = DAMAGED[name]
    if isinstance(content, bytes):
        config.write_bytes(content)
    else:
        config.write_text(content)
    with pytest.raises(UsageError, match=message) as e:
        AppConfig.load()
    assert str(config) in str(e.value) and "\n" not in str(e.value)


async def test_a_config_nested_200000_deep_starts_the_app_on_defaults(config, tiny_model_dir):
    """It gave a RecursionError in on_mount: a Rich traceback, and exit status 0."""
    config.write_text(DAMAGED["nested-200k"][0])
    app = ChatApp(str(tiny_model_dir))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None)
        notes = [n.message for n in app._notifications]
        assert any("nested too deeply" in n and "starting on defaults" in n for n in notes)
        assert app.chat.settings == ChatSettings()
    assert app.return_code in (0, None)
