"""Component: put the base model into the checkpoint store (dequantizing the built-in GGUF once)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Model

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def prepare_base(
    model_source: str = "builtin:smollm2-135m",
    store_uri: str = "",
    trust_remote_code: bool = False,
) -> NamedTuple("Outputs", [("model", Model)]):
    """Store the base model as a verified safetensors checkpoint; output it as a Model artifact.

    Args:
        model_source: 'builtin:smollm2-135m', 'builtin:tiny-random', a local model folder, or
            'hf:org/name[@revision]' (cluster configurations; needs the hub).
        store_uri: the checkpoint store every later step of this model uses: s3://bucket/prefix or a
            local folder; empty = $LMCOMPOSE_STORE, else $LMCOMPOSE_CACHE/store.  Credentials come from
            the environment (a Kubernetes Secret in a cluster), never from here.
        trust_remote_code: allow model code from the model's repository (off by default).

    Returns:
        model: the base model; its metadata names the content key, source, digest and size.
    """
    from components.runtime import run_prepare_base

    return run_prepare_base(model_source, store_uri, trust_remote_code)
