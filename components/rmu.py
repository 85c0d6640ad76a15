"""Component: the `rmu` intervention (see shared/interventions/rmu.py)."""

from kfp import dsl

from components.image import BASE_IMAGE

METHOD = "rmu"


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def rmu(store_uri: str, base_digest: str, parent_key: str, steps: str, data: str, trust_remote_code: bool = False) -> str:
    """Apply `rmu` (the last of ``steps``) to the checkpoint ``parent_key``; output the new checkpoint key."""
    from shared.execution import run_step

    return run_step(store_uri, base_digest, steps, data, parent_key, trust_remote_code)
