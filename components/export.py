"""Component: write an lm-compose model as a Hugging Face folder that any other component can load."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Input, Model

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def export(
    model: Input[Model],
    export_format: str = "auto",
) -> NamedTuple("Outputs", [("model", Model)]):
    """Write ``model`` (a reference into the checkpoint store) as a Hugging Face folder at the output's path.

    The output follows the KFP convention for models: the files are at ``model.path``, so
    ``AutoModelForCausalLM.from_pretrained(model.path)`` loads it in any downstream component.

    Args:
        model: the model to export -- the 'model' output of prepare_base or of an intervention.
        export_format: 'auto' (compressed-tensors pack-quantized for a quantized model whose weights are on
            their recorded grid, dense safetensors otherwise), 'dense', or 'pack-quantized' (quantized models
            only; refused if a later step moved the weights off their grid).

    Returns:
        model: a folder with config.json, *.safetensors, the tokenizer files and lm_compose.json
            (provenance); its metadata names the composition, every step, the compression state and the
            format written.
    """
    from components.runtime import run_export

    return run_export(model, export_format)
