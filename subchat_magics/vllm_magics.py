"""``%load_vllm`` and ``%unload_vllm``: load a model into this kernel with vLLM, free it.

Only argument parsing and output live here; the work is in
:mod:`subchat_magics.backends.vllm`, imported when a magic runs (so ``%load_ext`` stays
instant and vLLM is imported only by ``%load_vllm``)."""

from __future__ import annotations

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from .errors import SubchatError
from .magic_args import parse_line, usage_errors

DTYPE_CHOICES = ("auto", "half", "float16", "bfloat16", "float", "float32")


def _say(text: str) -> None:
    print(text, flush=True)


@magics_class
class VLLMMagics(Magics):
    """Load a model into this kernel with vLLM (``%load_vllm``), free it (``%unload_vllm``)."""

    @magic_arguments()
    @argument("model_path", nargs="?", default=None,
              help="Folder of the model (config.json and weights), e.g. "
                   "/kaggle/input/qwen-3/transformers/14b-awq/1, a number from the list "
                   "%%load_vllm prints without it, a unique part of a listed name, or a Hugging "
                   "Face model id "
                   "(org/name, e.g. Qwen/Qwen3-14B-AWQ: from the local Hugging Face cache, or "
                   "downloaded by vLLM). $VAR and {var} are expanded.")
    @argument("--tp", type=int, default=None,
              help="Tensor parallel size. Default: the number of visible CUDA devices (1 on CPU).")
    @argument("--gpu-memory-utilization", type=float, default=None,
              help="Fraction of each GPU's memory vLLM may use. Default: 0.91.")
    @argument("--dtype", choices=DTYPE_CHOICES, default=None,
              help="Weights/activations dtype. Default: half on GPUs below compute capability 8 "
                   "(T4), else auto.")
    @argument("--max-model-len", type=int, default=None,
              help="Context window in tokens (prompt + reply). Default: 5120 (or the model's "
                   "maximum if smaller).")
    @argument("--no-enforce-eager", action="store_true",
              help="Let vLLM capture CUDA graphs (faster decoding, slower load, more memory).")
    @argument("--no-prefix-caching", action="store_true",
              help="Turn vLLM's prefix cache off (subchats then recompute their inherited context).")
    @argument("--quantization", default=None,
              help="Quantization method, e.g. awq. Default: what the model's config says.")
    @argument("--think", action="store_true",
              help="Let thinking models (Qwen3) think before answering; shown collapsed.")
    @argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
              help="Any other vllm.LLM argument, e.g. --engine-arg max_num_seqs=16 (repeatable); "
                   "vLLM checks them before a loaded model is let go.")
    @argument("--verbose", action="store_true",
              help="Show vLLM's own log in the cell while loading (by default: one line per "
                   "phase, and the summary).")
    @argument("--plan", action="store_true",
              help="Print the plan without loading: weights per GPU, KV cache room at the chosen "
                   "--gpu-memory-utilization, tokens that fit, rows in flight at --max-model-len, "
                   "and the engine arguments.")
    @argument("--unload", action="store_true", help="Unload the loaded model (same as %%unload_vllm).")
    @line_magic
    @usage_errors("%load_vllm")
    def load_vllm(self, line: str = "") -> None:
        """Load a model into this kernel with vLLM and make it the active backend.

        The defaults are those that run Qwen3-14B-AWQ on Kaggle's 2xT4: tensor parallel
        over every visible GPU, half precision below compute capability 8,
        gpu_memory_utilization 0.91, enforce_eager, max_model_len 5120, prefix caching,
        trust_remote_code. A model already loaded is unloaded first.

        MODEL_PATH is a folder, or a Hugging Face model id (``org/name`` that is not a
        folder here): vLLM takes it from the local Hugging Face cache (``HF_HUB_CACHE``,
        ``HF_HOME``) or downloads it; the line before loading says which. With
        ``HF_HUB_OFFLINE=1`` only the cache is used. While loading, one line per phase
        (reading the config, loading weights, profiling memory, capturing graphs);
        ``--verbose`` shows vLLM's own log instead.

        Without MODEL_PATH it lists the models found under /kaggle/input (Kaggle's
        MODEL/FRAMEWORK/VARIATION/VERSION folders; ``SUBCHAT_KAGGLE_INPUT`` points
        elsewhere) and in the local Hugging Face cache, numbered: ``%load_vllm 2`` or a
        unique part of a name loads one. ``--plan`` prints where the memory would go
        (weights, KV cache, tokens that fit, rows in flight) without loading; every load
        prints the same two lines first, and refuses a --max-model-len that cannot fit
        before the loaded model is let go.

        Examples::

            %load_vllm
            %load_vllm 2 --plan
            %load_vllm qwen-3 --max-model-len 8192
            %load_vllm /kaggle/input/qwen-3/transformers/14b-awq/1
            %load_vllm Qwen/Qwen3-14B-AWQ
            %load_vllm $MODEL_PATH --max-model-len 8192 --think
            %load_vllm ./my-model --engine-arg max_num_seqs=16 --engine-arg seed=1
            %load_vllm --unload
        """
        from .backends import vllm as backend

        args = parse_line(self.load_vllm, line)
        if args.unload:
            if args.model_path:
                raise UsageError("%load_vllm: --unload takes no MODEL_PATH; "
                                 "use %load_vllm MODEL_PATH (it unloads the old model first)")
            self._unload()
            return
        if not args.model_path:
            if args.plan:
                raise UsageError("%load_vllm: --plan needs MODEL_PATH (a folder, a number from the "
                                 "list %load_vllm prints, or a Hugging Face model id)")
            self._list_models()
            return
        from .backends.vllm import discover

        args.model_path = discover.resolve(args.model_path)  # a number, a part of a name, a typo
        if args.tp is not None and args.tp < 1:
            raise UsageError(f"%load_vllm: --tp must be 1 or more, not {args.tp}")
        gmu = args.gpu_memory_utilization
        if gmu is not None and not 0.0 < gmu <= 1.0:
            raise UsageError(f"%load_vllm: --gpu-memory-utilization must be in (0, 1], e.g. 0.9, not {gmu}")
        if args.max_model_len is not None and args.max_model_len < 16:
            raise UsageError(f"%load_vllm: --max-model-len must be at least 16 tokens, not {args.max_model_len}")
        engine_args = dict(backend.parse_engine_arg(item) for item in args.engine_arg)
        settings = backend.LoadSettings(
            model=args.model_path, tensor_parallel_size=args.tp, gpu_memory_utilization=gmu,
            dtype=args.dtype, max_model_len=args.max_model_len,
            enforce_eager=not args.no_enforce_eager,
            enable_prefix_caching=not args.no_prefix_caching,
            quantization=args.quantization, think=args.think, engine_args=engine_args,
            verbose=args.verbose,
        )
        if args.plan:
            backend.plan_only(settings, echo=_say)
            return
        backend.load(settings, echo=_say)
        self._note_selection()

    @staticmethod
    def _gpu_totals() -> list[int]:
        from .backends.vllm import gpus

        return [g.total for g in gpus.probe(use_torch=False).gpus]

    def _list_models(self) -> None:
        from .backends.vllm import discover

        totals = self._gpu_totals()
        _say(discover.listing(discover.find_models(totals), totals))

    @line_magic
    @usage_errors("%unload_vllm")
    def unload_vllm(self, line: str = "") -> None:
        """Unload the vLLM model of this kernel and free its memory, so that another
        model can be loaded."""
        if line.strip():
            raise UsageError("%unload_vllm takes no arguments")
        self._unload()

    @staticmethod
    def _unload() -> None:
        from .backends import vllm as backend

        if backend.unload(echo=_say) is None:
            _say("No vLLM model is loaded.")

    @staticmethod
    def _note_selection() -> None:
        """Say where replies go when a setting sends them elsewhere than vLLM."""
        from .session import default_session

        try:
            name, source = default_session().requested_backend()
        except SubchatError:
            return
        if name not in ("auto", "vllm"):
            _say(f"note: replies still go to {name!r} (set by {source}); "
                 "%subchat backend vllm or --backend vllm sends them to this model")
