"""The engine: scheduler + block manager + runner + detokenisation, one `step()` at a time.

Everything a step needs is here; `LLM` (offline batches) and `AsyncEngine` (the server) only decide who
calls `step()` and where its outputs go.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints import huge_pages
from ..checkpoints import gguf
from ..checkpoints.hub import resolve_model
from ..inputs import PreprocessorConfig, PromptInputs, build_inputs
from ..layers.paged_attention import PagedKVPool
from ..models.registry import config_from_dir
from ..checkpoints.loader import load_line, load_model
from ..checkpoints.loader import log as load_log
from ..answers.outputs import RequestOutput, answer_boxes
from ..checkpoints.quantize import LoadQuantizer, check_quantization
from ..sampling_params import SamplingParams, checkpoint_sampling_defaults
from ..structured.logits_mask import GrammarMask, MaskedSampler
from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .block_manager import BlockManager
from .cpu_dtype import auto_cpu_dtype
from .encoder_cache import EncoderCache
from .runner import ModelRunner
from .sampler import Sampler
from .scheduler import Scheduler
from .sequence import Sequence
from .stopping import find_stop_string, held_back_chars

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "bundled"
MAX_KV_BLOCKS = 1 << 16


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_gb: float = 1.0               # KV memory; the block count is derived from it
    num_kv_blocks: int | None = None       # or the block count itself (tests use tiny pools)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048     # tokens per step (prefill chunks + decodes)
    max_encoder_tokens_per_step: int | None = None
    # Latency under load (issue 37): a step that decodes runs at most this many prefill tokens, and at most
    # this much vision tower (patch rows x blocks; images are then encoded ahead, a slice per step).
    # None: off (a prefill chunk takes the whole token budget; an image is encoded whole in one step).
    max_prefill_tokens_while_decoding: int | None = None
    vision_rows_per_step: int | None = None
    max_model_len: int | None = None       # default: the model's max_position_embeddings
    encoder_cache_tokens: int = 32768      # vision embeddings kept, in merged tokens
    enable_prefix_caching: bool = True
    attn_impl: str = "fast"                # "fast" or "reference" (the plain per-sequence SDPA path)
    quantization: str | None = None        # "int8" | "int4": weight-only, quantised at load (qwenvl/quantize.py)
    quantize_vision: bool = False          # also the vision tower's linears (saves memory, not time)
    quant_group_size: int = 128            # int4: input columns per scale/zero group (32, 64, 128 or 256)
    tensor_parallel_size: int = 1          # N > 1: the language model split over N processes (qwenvl/distributed/)
    mmproj: str | None = None              # the vision projector GGUF of a GGUF model (qwenvl/checkpoints/gguf/)

    def __post_init__(self):
        check_quantization(self.quantization)
        for name in ("max_prefill_tokens_while_decoding", "vision_rows_per_step"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")
        if self.tensor_parallel_size > 1 and self.quantization:
            raise ValueError(f"quantization={self.quantization!r} with tensor_parallel_size={self.tensor_parallel_size}"
                             " is not supported yet: quantise with tensor_parallel_size=1, or split the float model")


@dataclass
class _Request:
    seq: Sequence
    prompt: PromptInputs
    detok: IncrementalDetokenizer
    text: str = ""
    sent: int = 0                          # characters of `text` already handed out as deltas
    image_tokens: int = 0                  # the prompt's, counted once (every output of every step carries them)
    video_tokens: int = 0


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None or "auto": CUDA when this torch build sees a GPU, else the CPU. A CUDA device on a torch build
    without CUDA (or with no GPU visible) is a ValueError that says which torch is installed and what to do,
    instead of torch's own AssertionError deep in the first tensor move."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a device torch knows ({e}); use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None:
            raise ValueError(f"device {device!r}: the installed torch {torch.__version__} is a CPU-only build. "
                             "Install a CUDA build (e.g. `pip install torch --index-url "
                             "https://download.pytorch.org/whl/cu128`), or use --device cpu / auto")
        raise ValueError(f"device {device!r}: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; "
                         "check the driver and CUDA_VISIBLE_DEVICES, or use --device cpu / auto")
    return dev


def resolve_dtype(dtype, device: str | torch.device) -> torch.dtype:
    """None or "auto": bfloat16 on every GPU we target and on CPUs that multiply it fast, else float32."""
    if dtype is None or dtype == "auto":
        return auto_cpu_dtype() if torch.device(device).type == "cpu" else torch.bfloat16
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


class LLMEngine:
    def __init__(self, model_dir: str | Path | None = None, dtype=None, device: str | None = "auto",
                 config: EngineConfig = EngineConfig(), revision: str | None = None):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.config = config
        self.tp = None
        if gguf.is_gguf_model(model_dir, config.mmproj):
            # llama.cpp's files (qwenvl/checkpoints/gguf/): the model, tokenizer and pixels all come from them
            self._load_gguf(model_dir, config.mmproj)
        else:
            self._load_folder(model_dir, revision)
        text = self.cfg.text
        self.max_model_len = config.max_model_len or text.max_position_embeddings
        kv_heads = self.tp.num_local_kv_heads if self.tp else text.num_key_value_heads   # per rank's shard
        per_block = PagedKVPool.bytes_per_block(text.num_hidden_layers, config.block_size,
                                                kv_heads, text.head_dim, self.dtype)
        num_blocks = config.num_kv_blocks or int(min(MAX_KV_BLOCKS, max(8, config.kv_cache_gb * (1 << 30) // per_block)))
        pool = PagedKVPool(text.num_hidden_layers, num_blocks, config.block_size, kv_heads,
                           text.head_dim, self.dtype, self.device)
        if self.tp:
            self.tp.allocate_kv(num_blocks, config.block_size)
        for t in pool.k + pool.v:
            t.fill_(0)        # touch every page now: the KV memory is reserved up front, RSS stays flat after
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.encoder_cache = EncoderCache(config.encoder_cache_tokens)
        self.scheduler = Scheduler(
            self.block_manager, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_encoder_tokens_per_step=config.max_encoder_tokens_per_step,
            eos_token_ids=self.tokenizer.eos_token_ids,
            is_encoder_cached=lambda h: self.runner.has_features(h), max_model_len=self.max_model_len,
            encode_ahead=config.vision_rows_per_step is not None,
            max_prefill_tokens_while_decoding=config.max_prefill_tokens_while_decoding)
        self.sampler = Sampler(never_sample=(self.cfg.image_token_id, self.cfg.video_token_id),
                               eos_token_ids=self.tokenizer.eos_token_ids)
        self.grammar_mask = GrammarMask(self.tokenizer, text.vocab_size)
        self.sampler = MaskedSampler(self.sampler, self.grammar_mask)       # release() frees both
        self.runner = ModelRunner(self.model, pool, self.sampler, self.encoder_cache, attn_impl=config.attn_impl,
                                  vision_rows_per_step=config.vision_rows_per_step)
        self._requests: dict[str, _Request] = {}

    def _load_folder(self, model_dir, revision) -> None:
        # A folder path or a Hugging Face Hub id (qwenvl/hub.py); a Hub id keeps its name for the API.
        self.model_dir = resolve_model(model_dir, revision) if model_dir is not None else BUNDLED_MODEL_DIR
        from_hub = model_dir is not None and self.model_dir != Path(model_dir).expanduser()
        self.model_name = "qwenvl-bundled" if model_dir is None else \
            str(model_dir) if from_hub else self.model_dir.name
        config = self.config
        quantizer = LoadQuantizer(config.quantization, config.quant_group_size, config.quantize_vision) \
            if config.quantization else None
        if config.tensor_parallel_size > 1:
            from ..distributed.group import TensorParallelGroup
            load_log.info("%s", load_line(self.model_dir, config_from_dir(self.model_dir).model_type, self.device,
                                          self.dtype, config.quantization, config.tensor_parallel_size))
            self.tp = TensorParallelGroup(self.model_dir, self.dtype, self.device, config.tensor_parallel_size)
            self.model, self.cfg = self.tp.model, self.tp.cfg
        else:
            self.model, self.cfg = load_model(self.model_dir, dtype=self.dtype, device=self.device, quantizer=quantizer,
                                              fuse=True, progress=True)
            if huge_pages.requested() and self.device.type == "cpu":
                huge_pages.collapse_resident_memory()       # the weights, before the KV pool joins them
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.preprocessor = PreprocessorConfig.from_dir(self.model_dir)
        # temperature/top_p/top_k/repetition_penalty for requests that leave them out
        self.generation_defaults = checkpoint_sampling_defaults(self.model_dir)

    def _load_gguf(self, model, mmproj) -> None:
        if self.config.tensor_parallel_size > 1:
            raise ValueError("tensor_parallel_size > 1 with a GGUF model is not supported: load it on one device")
        pair = gguf.open_pair(model, mmproj)
        self.model_dir = pair.folder                 # generation_config.json / grounding prompt, if placed beside
        self.model_name = pair.name
        c = self.config
        load_log.info("%s", load_line(Path(model), "GGUF", self.device, self.dtype, c.quantization))
        self.model, self.cfg, vocabulary = gguf.load_gguf_model(
            pair, self.dtype, self.device, c.quantization, c.quant_group_size, c.quantize_vision, fuse=True)
        if huge_pages.requested() and self.device.type == "cpu":
            huge_pages.collapse_resident_memory()
        self.tokenizer = Tokenizer.from_gguf(vocabulary)
        beside = gguf.preprocessor_beside(pair)
        self.preprocessor = PreprocessorConfig.from_dir(beside) if beside else \
            PreprocessorConfig.from_dict(gguf.preprocessor_config(pair))
        self.generation_defaults = checkpoint_sampling_defaults(self.model_dir)

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes, if any (idempotent; also done at garbage collection)."""
        if self.tp is not None:
            self.tp.shutdown()

    # ---------------------------------------------------------------- requests
    def prepare(self, messages, chat_template_kwargs: dict | None = None,
                tools: list[dict] | None = None) -> PromptInputs:
        """Messages -> model inputs; raises InputError (a ValueError) naming what is wrong.
        `chat_template_kwargs` are template variables, e.g. {"enable_thinking": False}; `tools` are the
        checked tool declarations (qwenvl.structured.parse_tool_use) the prompt offers the model."""
        return build_inputs(messages, self.tokenizer, self.cfg, self.preprocessor,
                            chat_template_kwargs=chat_template_kwargs, tools=tools)

    def compile_grammar(self, spec):
        """The compiled grammar of a StructuredOutput (cached); raises InvalidStructuredOutputError. Callable
        from any thread, so a slow compile can run beside the step loop and its result go to add_request."""
        return self.grammar_mask.compile(spec)

    def add_request(self, request_id: str, prompt: PromptInputs, params: SamplingParams, grammar=None) -> None:
        """Queue a prepared prompt; raises ValueError when it can never fit (too long for the context or
        the KV cache) or the id is taken. `grammar`: params.structured already compiled (compile_grammar);
        without it a structured request compiles here, on the caller's thread."""
        seq = Sequence(request_id, prompt.token_ids, params, prompt.positions, prompt.next_position, prompt.vision)
        if params.structured is not None:
            if request_id in self._requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            self.grammar_mask.add(request_id, params.structured, grammar)   # a bad schema raises before queueing
        try:
            self.scheduler.add(seq)
        except ValueError:
            self.grammar_mask.release(request_id)
            raise
        self._requests[request_id] = _Request(
            seq, prompt, IncrementalDetokenizer(self.tokenizer),
            image_tokens=sum(v.num_tokens for v in prompt.vision if v.kind == "image"),
            video_tokens=sum(v.num_tokens for v in prompt.vision if v.kind == "video"))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its KV blocks are free when this returns."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.abort(request_id)
        self.sampler.release(request_id)
        return self._output(req, final=True)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, detokenise; one output per request that advanced."""
        plan = self.scheduler.schedule()
        sampled, logprobs = self.runner.step(plan.chunks, plan.encode)
        finished = {s.request_id for s in self.scheduler.postprocess(plan, sampled, logprobs, decide=self._decide)}
        outputs = []
        for seq in plan.failed:
            req = self._requests.pop(seq.request_id, None)
            self.sampler.release(seq.request_id)
            if req is not None:
                out = self._output(req, final=True)
                out.error = seq.error
                outputs.append(out)
        for rid in sampled:
            req = self._requests.get(rid)
            if req is None:
                continue                               # aborted during the step
            if rid in finished:
                self._requests.pop(rid)
                self.sampler.release(rid)
            outputs.append(self._output(req, final=rid in finished))
        return outputs

    def _decide(self, seq, token: int) -> str | None:
        """Every finish decision for a sampled token, in one place: the token-level stops (eos, stop ids,
        max_tokens, the context), then stop strings on the text the token adds (cut just before them)."""
        reason = self.scheduler.token_stop(seq, token)
        req = self._requests.get(seq.request_id)
        if req is None:
            return reason
        piece = req.detok.push(token)
        if reason == "length":
            piece += req.detok.flush()                 # bytes held back for a character never completed
        # A token that stopped generation (eos, stop_token_ids) is in token_ids but never in the text.
        if piece and reason != "stop":
            req.text += piece
            may_stop = seq.params.stop and seq.num_output_tokens > seq.params.min_tokens
            cut = find_stop_string(req.text, seq.params.stop, len(piece)) if may_stop else None
            if cut is not None:
                req.text = req.text[:cut]
                reason = "stop"
        return reason

    def _output(self, req: _Request, final: bool) -> RequestOutput:
        seq = req.seq
        if final and not seq.finish_reason:
            seq.finish_reason = "abort"
        visible = len(req.text) if final else len(req.text) - held_back_chars(req.text, seq.params.stop)
        delta = req.text[req.sent:visible] if visible > req.sent else ""
        req.sent = max(req.sent, visible)
        want_logprobs = seq.params.logprobs is not None
        out = RequestOutput(
            request_id=seq.request_id, text=req.text if final else req.text[:req.sent],
            delta_text=delta, token_ids=seq.output_token_ids,            # a new list (a slice)
            finish_reason=seq.finish_reason if final else None,
            logprobs=list(seq.output_logprobs) if want_logprobs else None,
            prompt_tokens=seq.num_prompt_tokens,
            image_tokens=req.image_tokens, video_tokens=req.video_tokens,
            cached_tokens=seq.num_cached_tokens)
        if final:
            out.boxes = answer_boxes(req.text, self.cfg.model_type, req.prompt.vision, req.prompt.reasoning_opened)
        return out

    # ------------------------------------------------------------------- stats
    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_used": bm.num_used_blocks,
            "kv_block_size": bm.block_size,
            "prefix_cache_hit_tokens": bm.prefix_cache_hit_tokens,
            "prefix_cache_queried_tokens": bm.prefix_cache_queried_tokens,
            "encoder_cache_hits": self.encoder_cache.hits,
            "encoder_cache_misses": self.encoder_cache.misses,
            "encoder_cache_tokens": self.encoder_cache.num_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_waiting": len(self.scheduler.waiting),
            "num_running": len(self.scheduler.running),
        }
