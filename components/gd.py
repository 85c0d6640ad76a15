"""Component: the `gd` intervention (see shared/interventions/gd.py)."""

from kfp import dsl

from components.image import BASE_IMAGE

METHOD = "gd"


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def gd(store_uri: str, base_digest: str, parent_key: str, steps: str, data: str, trust_remote_code: bool = False) -> str:
    """Apply `gd` (the last of ``steps``) to the checkpoint ``parent_key``; output the new checkpoint key."""
    from shared.execution import run_step

    return run_step(store_uri, base_digest, steps, data, parent_key, trust_remote_code)
