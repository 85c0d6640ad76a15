"""Registries stay in step: every intervention and evaluator has a KFP component, and components stay thin."""

from __future__ import annotations

import inspect

from components import evaluator_components, intervention_components
from components.image import BASE_IMAGE
from shared.evaluation import EVALUATOR_DATA
from shared.interventions import available
from shared.spec import EVALUATORS


def test_every_intervention_has_a_component():
    assert set(available()) == set(intervention_components())


def test_every_evaluator_has_a_component_and_a_library_entry():
    from shared.evaluation import get_evaluator

    assert set(EVALUATORS) == set(evaluator_components()) == set(EVALUATOR_DATA)
    for name in EVALUATORS:
        assert callable(get_evaluator(name))


def test_components_use_project_image_and_install_nothing():
    comps = {**intervention_components(), **evaluator_components()}
    for name, comp in comps.items():
        spec = comp.component_spec
        container = spec.implementation.container
        assert container.image == BASE_IMAGE, name
        command = " ".join(container.command or [])
        assert "pip install" not in command, f"{name} installs packages at run time"


def test_intervention_metadata_is_complete():
    for name, method in available().items():
        assert method.name == name
        fields = method.params_model.model_fields
        assert method.sweep_axis is None or method.sweep_axis in fields, name
        # defaults must validate on their own (a spec may omit params)
        method.parse_params({})
        assert method.needs_calibration == ("calibration" in method.data_inputs), name


def test_intervention_modules_import_heavy_libraries_lazily():
    """Every pipeline task imports the registry; llmcompressor at module level would add ~10 s per task."""
    import shared.interventions as pkg

    for name, method in available().items():
        source = inspect.getsource(inspect.getmodule(type(method)))
        head = source.split("\nclass ", 1)[0]
        assert "import llmcompressor" not in head and "from llmcompressor" not in head, name
    assert pkg is not None
