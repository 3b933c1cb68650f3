"""Teach plain transformers to load lrc checkpoints: `import compressor`, then
`AutoModelForCausalLM.from_pretrained(out_dir)` — no `trust_remote_code`.

config.json carries a `quantization_config` section with `quant_method: "lrc"` and a `modules` table
{module name: spec}. transformers looks the method up in its quantizer registry, where this module puts:
- `LrcConfig` (a `QuantizationConfigMixin`): parses and re-serialises the section losslessly (strict keys);
- `LrcHfQuantizer` (an `HfQuantizer`): after the model skeleton is built on the meta device and before any
  weight is read, swaps every listed `nn.Linear` for `modules.empty_module(spec, ...)`, so the checkpoint's
  `A.weight` / `qweight` / `scales` / ... keys find exactly matching parameters and buffers.

Lifecycle inside `from_pretrained` (transformers 5.x):
  get_hf_quantizer → LrcConfig.from_dict(config["quantization_config"]) → LrcHfQuantizer(config, pre_quantized=True)
  → model built on meta → preprocess_model → `_process_model_before_weight_loading` (module swap here)
  → weights loaded by name: floating tensors take the dtype of the empty param they fill (so fp16 `scales` stay
  fp16 in a bf16/fp32 model), integer tensors are never cast (int32 `qweight`/`qzeros` stay int32)
  → postprocess_model sets `model.config.quantization_config = LrcConfig`, so `model.save_pretrained` writes the
  section back and the saved directory loads again.

Never silently wrong without lrc: transformers only *warns* about an unknown `quant_method` and then builds a dense
model with random weights where the compressed linears were. So config.json's `model_type` is `MODEL_TYPE` (a
sentence naming `import compressor`) and the architecture's own type moves to `quantization_config.base_model_type`.
Without lrc, `AutoConfig` refuses an unknown model type with an error quoting it; after `import compressor`,
`LrcModelConfig` (registered under `MODEL_TYPE`) hands the dictionary back to the base architecture's config class,
so everything downstream sees a plain LlamaConfig / Qwen2Config / ... (`mark_config` writes this, io.py calls it).

A loaded model's own `save_pretrained` marks the config it writes the same way (`_save_marked`).

Registration runs on import and is idempotent (a second import or a reload of this module is a no-op).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.quantizers import HfQuantizer
from transformers.quantizers import auto as _auto
from transformers.utils.quantization_config import QuantizationConfigMixin

from compressor.nn.modules import empty_module, prepare_inference

QUANT_METHOD = "lrc"
# What plain transformers prints when it meets an lrc checkpoint ("has model type `...` but Transformers does not
# recognize this architecture"): it must tell the reader what to do. Part of the format: never change it.
MODEL_TYPE = "lrc (run 'import compressor' first; install lrc from its repository, not the PyPI package named lrc)"
_DEFAULT_VERSION = "0.1.0"
from compressor.nn.modules import KINDS as _KINDS  # noqa: E402  (every kind empty_module rebuilds)


def _version() -> str:
    import compressor

    return getattr(compressor, "__version__", _DEFAULT_VERSION)


class LrcConfig(QuantizationConfigMixin):
    """The `quantization_config` section of an lrc checkpoint's config.json.

    {"quant_method": "lrc", "lrc_version": "0.1.0", "method": "svd-llm", "recipe": "svd-llm-20",
     "modules": {"model.layers.0.self_attn.q_proj": {"kind": "lowrank", "rank": 12}, ...}}
    """

    def __init__(
        self,
        modules: dict[str, dict] | None = None,
        method: str | None = None,
        recipe: str | None = None,
        lrc_version: str | None = None,
        base_model_type: str | None = None,
        quant_method: str = QUANT_METHOD,
        **unknown,
    ):
        if unknown:
            raise ValueError(
                f"lrc quantization_config has unknown keys {sorted(unknown)} "
                f"(written by a newer lrc? this is lrc {_version()})"
            )
        if quant_method != QUANT_METHOD:
            raise ValueError(f"LrcConfig got quant_method={quant_method!r}, expected {QUANT_METHOD!r}")
        self.quant_method = QUANT_METHOD
        self.lrc_version = lrc_version or _version()
        self.method = method
        self.recipe = recipe
        self.base_model_type = base_model_type  # None in checkpoints written before MODEL_TYPE existed
        self.modules = {str(name): dict(spec) for name, spec in (modules or {}).items()}
        for name, spec in self.modules.items():
            if spec.get("kind") not in _KINDS:
                raise ValueError(f"lrc quantization_config: module {name!r} has unknown kind {spec.get('kind')!r}")

    def to_dict(self) -> dict:
        out = {
            "quant_method": self.quant_method,
            "lrc_version": self.lrc_version,
            "method": self.method,
            "recipe": self.recipe,
            "modules": {name: dict(spec) for name, spec in self.modules.items()},
        }
        if self.base_model_type is not None:
            out["base_model_type"] = self.base_model_type
        return out

    def __iter__(self):
        yield from self.to_dict().items()


def install_line() -> str:
    """The pip command that installs this project (the PyPI name `lrc` belongs to another project): from the
    repository named by the package's Source/Repository/Homepage URL in pyproject.toml's [project.urls]."""
    from importlib import metadata

    try:
        urls = metadata.metadata("lrc").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        urls = []
    for entry in urls:
        label, _, url = entry.partition(",")
        if label.strip().lower() in ("source", "repository", "homepage") and url.strip():
            return f'pip install "lrc @ git+{url.strip()}"'
    return 'pip install "lrc @ git+<URL of the lrc repository>"'  # pyproject.toml has no [project.urls] yet


def mark_config(config: dict) -> dict:
    """Make a config.json dictionary that carries an lrc `quantization_config` unloadable without lrc: its
    `model_type` becomes MODEL_TYPE and the architecture's own type moves into the section. Idempotent."""
    qc = config["quantization_config"]
    if config.get("model_type") != MODEL_TYPE:
        qc["base_model_type"] = config["model_type"]
        config["model_type"] = MODEL_TYPE
    return config


class LrcModelConfig(PretrainedConfig):
    """Registered with AutoConfig under MODEL_TYPE; never instantiated: `from_dict` returns the base architecture's
    config (LlamaConfig, ...), so AutoModelForCausalLM, AutoTokenizer and save_pretrained see the real model."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        qc = config_dict.get("quantization_config")
        base = qc.get("base_model_type") if isinstance(qc, dict) else None
        if not isinstance(base, str) or base == MODEL_TYPE or base not in CONFIG_MAPPING:
            raise ValueError(f"lrc checkpoint: config.json's quantization_config names no known base_model_type "
                             f"(got {base!r})")
        return CONFIG_MAPPING[base].from_dict({**config_dict, "model_type": base}, **kwargs)


def _resolve_names(model: nn.Module, names) -> dict[str, str]:
    """Checkpoint module name -> name in `model`. Names are recorded on the full (e.g. *ForCausalLM) model; a
    bare base model (AutoModel) lacks the `base_model_prefix.` part and has no head, whose entries are skipped."""
    present = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    loading_base_model = bool(prefix) and not hasattr(model, prefix)
    resolved = {}
    for name in names:
        if name in present:
            resolved[name] = name
        elif loading_base_model and name.startswith(prefix + "."):
            resolved[name] = name[len(prefix) + 1 :]
        elif loading_base_model:
            continue  # a head module (lm_head) that this base model does not have
        else:
            raise ValueError(f"lrc checkpoint lists module {name!r}, which this {type(model).__name__} does not have")
    return resolved


def replace_linears(model: nn.Module, modules: dict[str, dict]) -> None:
    """Swap each listed nn.Linear of `model` for an empty compressed module of the same shape, bias, dtype and
    device (on the meta device during `from_pretrained`)."""
    for name, target in _resolve_names(model, modules).items():
        old = model.get_submodule(target)
        if not isinstance(old, nn.Linear):
            kind = type(old).__name__
            raise ValueError(f"lrc checkpoint lists {name!r} as compressed, but it is a {kind}, not a Linear")
        new = empty_module(
            modules[name],
            old.in_features,
            old.out_features,
            old.bias is not None,
            dtype=old.weight.dtype,
            device=old.weight.device,
        )
        parent_name, _, child = target.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)


class LrcHfQuantizer(HfQuantizer):
    """Loads pre-compressed lrc checkpoints; never compresses on the fly (that needs calibration: `lrc compress`)."""

    requires_calibration = True  # from_pretrained(dense_model, quantization_config=LrcConfig()) is refused
    quantization_config: LrcConfig

    def _process_model_before_weight_loading(self, model, **kwargs):
        replace_linears(model, self.quantization_config.modules)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # The loaded config is the base architecture's (LlamaConfig, ...), whose save writes its own model_type:
        # this model's own save_pretrained (push_to_hub and Trainer go through it) marks the copy it writes.
        model.save_pretrained = functools.partial(_save_marked, model)
        prepare_inference(model)  # stored codes -> packed kernel layouts, once (compressor/nn/kernels.py)
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _save_marked(model, save_directory, *args, **kwargs):
    """`model.save_pretrained` of a loaded lrc model: the saved config.json gets MODEL_TYPE back (`mark_config`),
    so the copy is as unloadable without lrc as the original, never silently random."""
    if kwargs.get("push_to_hub"):
        raise ValueError("save an lrc model first, then upload the folder (`lrc upload` or "
                         "huggingface_hub.upload_folder): save_pretrained(push_to_hub=True) would upload its config "
                         "before lrc marks it")
    result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
    config_file = Path(save_directory) / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        qc = config.get("quantization_config")
        if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD:
            config_file.write_text(json.dumps(mark_config(config), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return result


def register() -> None:
    """Put LrcConfig / LrcHfQuantizer into transformers' registries. Idempotent; refuses to displace a different
    library's "lrc" registration."""
    for mapping, cls, decorator in (
        (_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, LrcConfig, _auto.register_quantization_config),
        (_auto.AUTO_QUANTIZER_MAPPING, LrcHfQuantizer, _auto.register_quantizer),
    ):
        current = mapping.get(QUANT_METHOD)
        if current is cls:
            continue
        if current is not None and current.__module__ != cls.__module__:
            raise RuntimeError(
                f"transformers already has quant_method {QUANT_METHOD!r} registered by "
                f"{current.__module__}.{current.__qualname__}"
            )
        mapping.pop(QUANT_METHOD, None)  # our own class from an earlier import of this module (reload)
        decorator(QUANT_METHOD)(cls)
    current = CONFIG_MAPPING._extra_content.get(MODEL_TYPE)
    if current is not None and current.__module__ != LrcModelConfig.__module__:
        raise RuntimeError(f"transformers already has model type {MODEL_TYPE!r} registered by {current.__module__}")
    AutoConfig.register(MODEL_TYPE, LrcModelConfig, exist_ok=True)


register()
