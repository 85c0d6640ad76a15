"""Component: the `memit` intervention (see shared/interventions/memit.py)."""

from kfp import dsl

from components.image import BASE_IMAGE

METHOD = "memit"


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def memit(store_uri: str, base_digest: str, parent_key: str, steps: str, data: str, trust_remote_code: bool = False) -> str:
    """Apply `memit` (the last of ``steps``) to the checkpoint ``parent_key``; output the new checkpoint key."""
    from shared.execution import run_step

    return run_step(store_uri, base_digest, steps, data, parent_key, trust_remote_code)
