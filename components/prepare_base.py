"""Component: put the base model into the checkpoint store (dequantizing the built-in GGUF once)."""

from typing import NamedTuple, Optional

from kfp import dsl
from kfp.dsl import Input, Model

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def prepare_base(
    model_source: str = "",
    store_uri: str = "",
    trust_remote_code: bool = False,
    model: Optional[Input[Model]] = None,
) -> NamedTuple("Outputs", [("model", Model)]):
    """Store the base model as a verified safetensors checkpoint; output it as a Model artifact.

    Args:
        model_source: 'builtin:smollm2-135m' (the default when neither this nor model is given),
            'builtin:tiny-random', a local model folder, 's3://bucket/prefix' (a model folder in a bucket) or
            'hf:org/name[@revision]' (cluster configurations; needs the hub).  A folder is identified by the
            hashes of its files: a changed folder is a new base model.
        store_uri: the checkpoint store every later step of this model uses: s3://bucket/prefix or a
            local folder; empty = $LMCOMPOSE_STORE, else $LMCOMPOSE_CACHE/store.  Credentials come from
            the environment (a Kubernetes Secret in a cluster), never from here.
        trust_remote_code: allow model code from the model's repository (off by default).
        model: instead of model_source, a Model artifact holding a Hugging Face folder (config.json,
            *.safetensors, tokenizer files at model.path -- the output of another pipeline's training
            component or of dsl.importer).

    Returns:
        model: the base model; its metadata names the content key, source, digest and size.
    """
    from components.runtime import run_prepare_base

    return run_prepare_base(model_source, store_uri, trust_remote_code, model)
