"""Plugin registration through SGLang's entry-point loader, the server flags, and the ServerArgs hooks."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sglang_mage import hooks
from sglang_mage.config import MageConfigError

TINY_SDAR = {
    "architectures": ["SDARForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 256,
    "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}


def run_py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("mage") == "sglang_mage.plugin:register"


def test_launch_server_help_lists_mage_and_its_flags():
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "mage" in text.split("--attention-backend", 1)[1].split("--", 1)[0]
    import dataclasses

    from sglang_mage.config import MageConfig

    # every option has its flag (derived from the config, so a new option cannot miss one)
    flags = ["--mage-" + f.name.replace("_", "-") for f in dataclasses.fields(MageConfig)]
    for flag in flags + ["--no-mage-sparse-commit", "--no-mage-graph-first-step", "--no-mage-overlap-selection"]:
        assert flag in text, flag


def test_registration_is_idempotent_and_lazy():
    # In a fresh process: SGLang's own loader runs our register(); neither the backend, our Triton ops nor
    # FlashInfer may be imported by it; a second register() changes nothing.
    out = run_py(
        "import sys\n"
        "from sglang.srt.plugins import load_plugins\n"
        "load_plugins()\n"
        "from sglang_mage import plugin\n"
        "from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS\n"
        "from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES\n"
        "assert plugin._registered and ATTENTION_BACKENDS['mage'] is plugin.create_mage_backend\n"
        "plugin.register(); plugin.register()\n"
        "assert ATTENTION_BACKEND_CHOICES.count('mage') == 1\n"
        "heavy = [m for m in sys.modules if m.startswith(('sglang_mage.ops', 'sglang_mage.backend', 'flashinfer'))]\n"
        "assert not heavy, heavy\n"
        "print('OK')\n"
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sdar")
    (path / "config.json").write_text(json.dumps(TINY_SDAR))
    return str(path)


SERVER_ARGS = (
    "from sglang.srt.plugins import load_plugins\n"
    "load_plugins()\n"
    "from sglang.srt.server_args import ServerArgs, prepare_server_args\n"
)


def test_engine_kwargs_and_cli_flags_reach_server_args(model_dir):
    out = run_py(
        SERVER_ARGS
        + f"sa = ServerArgs(model_path={model_dir!r}, attention_backend='mage', dllm_algorithm='LowConfidence',"
        "               mage_k=64, mage_selector='vote', mage_prefill_chunk_size=256, device='cpu',"
        "               skip_tokenizer_init=True)\n"
        "assert sa.attention_backend == 'mage', sa.attention_backend\n"
        "assert sa.mage_config.k == 64 and sa.mage_config.selector == 'vote'\n"
        "assert sa.mage_config.prefill_chunk_size == 256\n"
        "import pickle; assert pickle.loads(pickle.dumps(sa)).mage_config == sa.mage_config\n"
        f"sa = prepare_server_args(['--model-path', {model_dir!r}, '--attention-backend', 'mage', '--device', 'cpu',"
        "    '--dllm-algorithm', 'JointThreshold', '--mage-k', '128', '--no-mage-sparse-commit',"
        "    '--mage-prefill-chunk-size', '0'])\n"
        "assert sa.mage_config.k == 128 and sa.mage_config.sparse_commit is False, sa.mage_config\n"
        "assert sa.mage_config.prefill_chunk_size == 0, sa.mage_config\n"
        "print('OK')\n"
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ("attention_backend='mage', dllm_algorithm='LowConfidence', mage_k=0", "--mage-k"),
        ("attention_backend='mage', dllm_algorithm='LowConfidence', mage_selector='lsh'", "--mage-selector"),
        ("attention_backend='mage', dllm_algorithm='LowConfidence', mage_topk=3", "unknown MAGE option"),
        ("attention_backend='mage', dllm_algorithm='LowConfidence', mage_prefill_chunk_size=-1",
         "--mage-prefill-chunk-size"),
        ("attention_backend='mage'", "--dllm-algorithm"),
    ],
)
def test_bad_options_fail_at_server_args(model_dir, kwargs, message):
    out = run_py(SERVER_ARGS + f"ServerArgs(model_path={model_dir!r}, device='cpu', {kwargs})\n")
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-3000:]


def test_dllm_backend_swap_keeps_mage_and_the_graph():
    disabled = "disabled"
    graphs = SimpleNamespace(decode=SimpleNamespace(backend="full"))
    args = SimpleNamespace(attention_backend="mage", dllm_algorithm="LowConfidence", cuda_graph_config=graphs)

    def upstream(self):  # what SGLang does: swap to flashinfer while the decode graph is on
        if self.cuda_graph_config.decode.backend != disabled:
            self.attention_backend = "flashinfer"

    hooks.handle_dllm_inference_around(upstream, args)
    # mage captures its sparse steps in the dLLM graph (tests/backend/test_cuda_graph_plan.py)
    assert args.attention_backend == "mage" and graphs.decode.backend == "full"

    other = SimpleNamespace(attention_backend="triton", dllm_algorithm="LowConfidence",
                            cuda_graph_config=SimpleNamespace(decode=SimpleNamespace(backend="full")))
    hooks.handle_dllm_inference_around(upstream, other)
    assert other.attention_backend == "flashinfer"  # other backends keep SGLang's behaviour


def test_config_error_type_is_value_error():
    assert issubclass(MageConfigError, ValueError)
