"""Every place where sglang-mage changes SGLang 0.5.14's behaviour, in one file.

Each hook says why it exists, what upstream code it wraps, and when it can go. All are registered through
`sglang.srt.plugins.hook_registry.HookRegistry` (no SGLang file is edited), except the per-instance
`ReqToTokenPool.free` listener, which the backend installs on its own pool object only. The scheduler-side
hooks of chunked prompt prefill are listed in one table in `chunked_prefill.py`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from . import BACKEND_NAME, config
from .chunked_prefill import holds_prompt_chunk

logger = logging.getLogger("sglang_mage")

# `--mage-*` values parsed by argparse, handed from `from_cli_args` to the `__init__` that it calls.
_pending = threading.local()

SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
TOKENIZER_MANAGER = "sglang.srt.managers.tokenizer_manager"
DECODE_GRAPH_RUNNER = "sglang.srt.model_executor.runner.decode_cuda_graph_runner"
# SGLang runs one dLLM request at a time unless --max-running-requests is given (DllmConfig). With mage the
# plugin's per-request state is bounded by this, and batching is where sparse steps pay off most.
DEFAULT_MAX_RUNNING_REQUESTS = 8


def add_cli_args_after(result: Any, parser: Any, *args: Any, **kwargs: Any) -> None:
    """Why: plugins have no API for server flags. Wraps `ServerArgs.add_cli_args` (static) so that
    `launch_server --help` lists the `--mage-*` group. Remove when SGLang grows plugin arguments."""
    config.add_cli_args(parser)


def from_cli_args_around(original: Any, cls: Any, args: Any) -> Any:
    """Why: `from_cli_args` keeps only dataclass fields. Wraps it to carry the `--mage-*` values into the
    `ServerArgs.__init__` hook below."""
    _pending.values = config.values_from_namespace(args)
    try:
        return original(cls, args)
    finally:
        _pending.values = None


def server_args_init_around(original: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """Why: `sgl.Engine(**kwargs)` passes every keyword to `ServerArgs(...)`, which rejects unknown ones.
    Wraps `ServerArgs.__init__`: removes `mage_*` keywords, runs SGLang's own init, then validates the
    options and attaches them as `server_args.mage_config` (pickled with the object into the scheduler
    processes). Also rejects `mage` without a dLLM algorithm, which would otherwise fail in a subprocess."""
    values = config.pop_engine_kwargs(kwargs)
    cli_values = getattr(_pending, "values", None)
    if cli_values:
        values = {**cli_values, **values}
    original(self, *args, **kwargs)
    uses_mage = getattr(self, "attention_backend", None) == BACKEND_NAME
    if values and not uses_mage:
        logger.warning("MAGE options %s are ignored: --attention-backend is not 'mage'", sorted(values))
    self.mage_config = config.resolve(values) if (uses_mage or values) else None
    if uses_mage and getattr(self, "dllm_algorithm", None) is None:
        raise ValueError(
            "--attention-backend mage serves block-diffusion models only: also pass --dllm-algorithm "
            "(e.g. LowConfidence or JointThreshold)"
        )


# SGLang's own dLLM model classes, which its decode graph runner captures (for flashinfer) with a capture batch
# that has no extend_* fields and replays without running Python. A model class added by a plugin may need
# either (Fast-dLLM v2's token shift reads extend_start_loc and carries hidden states between forwards).
GRAPH_CAPTURABLE_ARCHITECTURES = frozenset({"SDARForCausalLM", "SDARMoeForCausalLM", "LLaDA2MoeModelLM"})


def _architecture(server_args: Any) -> str | None:
    try:
        return server_args.get_model_config().hf_config.architectures[0]
    except Exception:  # noqa: BLE001 - SGLang reports an unreadable model config itself
        return None


def _graph_off_unless_capturable(server_args: Any) -> None:
    """A dLLM model class outside GRAPH_CAPTURABLE_ARCHITECTURES (one an adapter of this plugin adds) runs
    eagerly with every backend: flashinfer's dLLM graph would capture it with the same extend-less batch."""
    from sglang.srt.model_executor.cuda_graph_config import Backend

    graphs = getattr(server_args, "cuda_graph_config", None)
    arch = _architecture(server_args)
    if graphs is None or graphs.decode.backend == Backend.DISABLED or arch is None:
        return
    if arch not in GRAPH_CAPTURABLE_ARCHITECTURES and arch in _plugin_architectures():
        logger.warning("sglang-mage: the dLLM decode CUDA graph is turned off for %s (its model class reads "
                       "per-forward extend offsets, which a captured batch lacks); every step runs eagerly", arch)
        graphs.decode.backend = Backend.DISABLED


def _plugin_architectures() -> frozenset:
    """Architectures whose model class this plugin registers (the rest belong to SGLang, which decides)."""
    from .model_adapters.fast_dllm_v2 import ARCHITECTURE as FAST_DLLM_V2

    return frozenset({FAST_DLLM_V2})


def handle_dllm_inference_around(original: Any, self: Any) -> Any:
    """Why: `ServerArgs._handle_dllm_inference` silently replaces any attention backend by flashinfer while
    the dLLM decode CUDA graph is on. mage captures its sparse DLLM_EXTEND steps in that graph
    (sglang_mage.cuda_graph), so with `mage` selected the graph stays as the user set it (on unless
    `--disable-cuda-graph`), and SGLang's branch is shown `flashinfer` so that it keeps its hands off; every
    other effect of that method is SGLang's own. Architectures outside GRAPH_CAPTURABLE_ARCHITECTURES get the
    graph turned off, loudly. Remove when SGLang stops overriding the dLLM backend."""
    if getattr(self, "dllm_algorithm", None):
        _graph_off_unless_capturable(self)
    if getattr(self, "attention_backend", None) == BACKEND_NAME and getattr(self, "dllm_algorithm", None):
        if getattr(self, "max_running_requests", 0) is None:
            logger.info(
                "sglang-mage: --max-running-requests defaults to %d with --attention-backend mage (SGLang's "
                "dLLM default is 1)", DEFAULT_MAX_RUNNING_REQUESTS,
            )
            self.max_running_requests = DEFAULT_MAX_RUNNING_REQUESTS
        self.attention_backend = "flashinfer"
        try:
            return original(self)
        finally:
            # Anything else (on AMD, SGLang picks triton for every dLLM backend) is SGLang's decision.
            if self.attention_backend == "flashinfer":
                self.attention_backend = BACKEND_NAME
    return original(self)


def can_run_graph_around(original: Any, self: Any, forward_batch: Any) -> Any:
    """Why: only mage knows whether a DLLM_EXTEND batch is a sparse step the captured graph computes, and it
    knows only after planning, which must happen once per forward and before SGLang picks graph or eager.
    Wraps `DecodeCudaGraphRunner.can_run_graph` (called once per forward by `ModelRunner._forward_raw`): the
    backend plans and parks the decision (`MageCudaGraphMixin.mage_graph_gate`), and SGLang's own checks
    (batch size, hidden-state mode...) still apply. Other backends and forward modes are untouched. Remove
    when SGLang asks the attention backend whether a batch may replay."""
    if not forward_batch.forward_mode.is_dllm_extend():
        return original(self, forward_batch)
    gate = getattr(self.attn_backend, "mage_graph_gate", None)
    if gate is None:
        # Another backend's prompts are chunked only under the benchmark switch (chunked_prefill.
        # BENCH_ANY_BACKEND_ENV). SGLang checks the batch size alone, and a chunk (more than one block per
        # request) would be copied into buffers captured at B tokens per request: run it eagerly.
        block = getattr(self, "num_tokens_per_bs", None)
        if block and holds_prompt_chunk(getattr(forward_batch, "extend_seq_lens_cpu", None), block):
            return False
        return original(self, forward_batch)
    eligible = gate(forward_batch, token=getattr(self.model_runner, "forward_pass_id", None))
    # Planned either way: a batch SGLang then refuses runs eagerly on the parked decision.
    return original(self, forward_batch) if eligible else False


def capture_one_shape_around(original: Any, self: Any, size: Any, forward: Any, stream_idx: Any = None,
                             variant_label: Any = None) -> Any:
    """Why: with --mage-graph-first-step a block's first step has its own captured graph per batch size (the
    exact pass and selection; the sparse graph has neither). Wraps `DecodeCudaGraphRunner.capture_one_shape`:
    after SGLang captures a batch size as usual (the sparse step), it captures the same size again under the
    variant label `cuda_graph.FIRST_STEP_VARIANT`, with the backend switched to its first-step path for that
    capture. SGLang keys graphs by (size, stream, variant), so both live side by side. Only a mage backend
    with first-step graphs set up (`graph_first_capacity`) is affected. Remove when SGLang lets a backend
    capture more than one graph per shape."""
    out = original(self, size, forward, stream_idx, variant_label)
    backend = getattr(self, "attn_backend", None)
    if variant_label is None and getattr(backend, "graph_first_capacity", None) is not None:
        from .cuda_graph import FIRST_STEP_VARIANT

        backend.capture_first_step = True
        try:
            original(self, size, forward, stream_idx, FIRST_STEP_VARIANT)
        finally:
            backend.capture_first_step = False
    return out


def resolve_graph_variant_around(original: Any, self: Any, forward_batch: Any) -> Any:
    """Why: the replay must pick the graph the backend planned for this forward, which SGLang cannot know.
    Wraps `DecodeCudaGraphRunner._resolve_lora_variant`, which `load_batch` calls right after the backend's
    `init_forward_metadata_out_graph` to build the replay key: a mage backend that planned a first-step
    replay names `FIRST_STEP_VARIANT` (`graph_variant`); everything else gets SGLang's own answer. Remove
    with capture_one_shape_around."""
    variant = getattr(getattr(self, "attn_backend", None), "graph_variant", None)
    return variant if variant is not None else original(self, forward_batch)


def validate_request_around(original: Any, self: Any, obj: Any, input_ids: Any) -> Any:
    """Why: an empty prompt reaches SGLang's dLLM scheduler as a block of [MASK] at position 0 with no
    context; reject it per request (HTTP 400 / an exception from `Engine.generate`), before it is queued.
    Wraps `TokenizerManager._validate_one_request`, whose ValueErrors SGLang already returns to the caller.
    Only for servers running `--attention-backend mage`."""
    server_args = getattr(self, "server_args", None)
    if getattr(server_args, "attention_backend", None) == BACKEND_NAME:
        if input_ids is not None and len(input_ids) == 0:
            raise ValueError(
                "sglang-mage: the prompt is empty; a block-diffusion request needs at least one prompt token"
            )
    return original(self, obj, input_ids)


def register_server_args_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(f"{SERVER_ARGS}.add_cli_args", add_cli_args_after, HookType.AFTER)
    HookRegistry.register(f"{SERVER_ARGS}.from_cli_args", from_cli_args_around, HookType.AROUND)
    HookRegistry.register(f"{SERVER_ARGS}.__init__", server_args_init_around, HookType.AROUND)
    HookRegistry.register(f"{SERVER_ARGS}._handle_dllm_inference", handle_dllm_inference_around, HookType.AROUND)
    from .compat import hook_when_imported

    # The tokenizer manager pulls in most of SGLang: patch it when SGLang itself imports it.
    hook_when_imported(TOKENIZER_MANAGER, f"{TOKENIZER_MANAGER}.TokenizerManager._validate_one_request",
                       validate_request_around, HookType.AROUND)
    for target, function in (("can_run_graph", can_run_graph_around), ("capture_one_shape", capture_one_shape_around),
                             ("_resolve_lora_variant", resolve_graph_variant_around)):
        hook_when_imported(DECODE_GRAPH_RUNNER, f"{DECODE_GRAPH_RUNNER}.DecodeCudaGraphRunner.{target}", function,
                           HookType.AROUND)


def install_slot_free_listener(req_to_token_pool: Any, on_free: Any) -> None:
    """Why: the index cache is keyed by the request's pool slot, and a finished or aborted request must not
    leave indices that the slot's next owner could read. Every release path in SGLang 0.5.14 ends in
    `ReqToTokenPool.free(req)` (`mem_cache/common.py::release_kv_cache`), so the backend wraps that method
    on its own pool instance (not the class: other engines in the process are untouched). `clear()` (a
    cache flush) drops every entry."""
    if getattr(req_to_token_pool, "_mage_listeners", None) is None:
        req_to_token_pool._mage_listeners = []
        free, clear = req_to_token_pool.free, req_to_token_pool.clear

        def free_and_notify(req: Any) -> Any:
            slot = req.req_pool_idx
            out = free(req)
            for listener in req_to_token_pool._mage_listeners:
                listener(slot)
            return out

        def clear_and_notify() -> Any:
            out = clear()
            for listener in req_to_token_pool._mage_listeners:
                listener(None)
            return out

        req_to_token_pool.free = free_and_notify
        req_to_token_pool.clear = clear_and_notify
    req_to_token_pool._mage_listeners.append(on_free)
