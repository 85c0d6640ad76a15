"""Component: put the base model into the store (dequantizing the built-in GGUF once)."""

from typing import NamedTuple

from kfp import dsl

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def prepare_base(store_uri: str, model_source: str, trust_remote_code: bool = False) -> NamedTuple(
    "BaseModel", [("base_digest", str), ("model_key", str)]
):
    """Store the base model as a verified safetensors checkpoint; output its content digest and key."""
    from collections import namedtuple

    from shared.execution import prepare_base as run

    digest, key = run(store_uri, model_source, trust_remote_code)
    return namedtuple("BaseModel", ["base_digest", "model_key"])(digest, key)
