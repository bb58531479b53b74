"""Per-request validation and serving defaults that the plugin adds for `--attention-backend mage`: an empty
prompt is rejected before it is queued (never a scheduler crash), and `--max-running-requests` defaults to
a batch instead of SGLang's single dLLM request."""

from types import SimpleNamespace

import pytest

from sglang_mage import hooks
from tests.backend.test_plugin import SERVER_ARGS, model_dir, run_py  # noqa: F401 - model_dir is a fixture


def _tm(backend):
    return SimpleNamespace(server_args=SimpleNamespace(attention_backend=backend))


def test_empty_prompt_is_rejected_per_request_with_mage():
    calls = []
    original = lambda self, obj, ids: calls.append(list(ids))  # noqa: E731
    with pytest.raises(ValueError, match="prompt is empty"):
        hooks.validate_request_around(original, _tm("mage"), SimpleNamespace(), [])
    hooks.validate_request_around(original, _tm("mage"), SimpleNamespace(), [5, 6])
    hooks.validate_request_around(original, _tm("flashinfer"), SimpleNamespace(), [])  # other backends: upstream
    assert calls == [[5, 6], []]


def test_validation_hook_is_installed_when_sglang_imports_the_tokenizer_manager(model_dir):  # noqa: F811
    out = run_py(
        SERVER_ARGS
        + "import sys\n"
        "assert 'sglang.srt.managers.tokenizer_manager' not in sys.modules\n"
        "from sglang.srt.managers.tokenizer_manager import TokenizerManager\n"
        "from types import SimpleNamespace as NS\n"
        "tm = NS(server_args=NS(attention_backend='mage'))\n"
        "try:\n"
        "    TokenizerManager._validate_one_request(tm, NS(sampling_params={}), [])\n"
        "except ValueError as e:\n"
        "    assert 'prompt is empty' in str(e), e\n"
        "    print('OK')\n"
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_max_running_requests_defaults_to_a_batch_with_mage_only(model_dir):  # noqa: F811
    common = f"model_path={model_dir!r}, device='cpu', skip_tokenizer_init=True, dllm_algorithm='LowConfidence'"
    out = run_py(
        SERVER_ARGS
        + f"sa = ServerArgs({common}, attention_backend='mage')\n"
        f"assert sa.max_running_requests == {hooks.DEFAULT_MAX_RUNNING_REQUESTS}, sa.max_running_requests\n"
        f"sa = ServerArgs({common}, attention_backend='mage', max_running_requests=2)\n"
        "assert sa.max_running_requests == 2, sa.max_running_requests\n"
        f"sa = ServerArgs({common}, attention_backend='flashinfer')\n"
        "assert sa.max_running_requests is None, sa.max_running_requests\n"
        "print('OK')\n"
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
