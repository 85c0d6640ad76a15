"""Per-item scores: the statistic they reproduce, their storage beside each evaluation result."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from shared.item_scores import ItemScores, Scores, check_consistent, items_from_json, items_to_json


def test_mean_ratio_and_exp_statistics_by_hand() -> None:
    assert ItemScores.of([1, 0, 1, 1]).value() == pytest.approx(0.75)
    # perplexity: exp(sum nll / sum tokens) = exp((2 + 6) / (2 + 2))
    ppl = ItemScores.of([2.0, 6.0], weights=[2, 2], transform="exp")
    assert ppl.value() == pytest.approx(math.exp(2.0))
    # two strata (two tasks averaged): mean of 1/2 and 1/1, not the pooled 2/3
    strat = ItemScores.of([1, 0, 1], strata=[0, 0, 1])
    assert strat.value() == pytest.approx(0.75)


def test_resampled_rows_recompute_the_statistic() -> None:
    scores = ItemScores.of([0.0, 1.0, 0.5])
    index = np.array([[0, 1, 2], [1, 1, 1], [0, 0, 2]])
    assert scores.resampled(index).tolist() == pytest.approx([0.5, 1.0, 1 / 6])


def test_json_round_trip_and_validation() -> None:
    items = {"perplexity": ItemScores.of([2.0, 6.0], weights=[2, 2], transform="exp"),
             "utility_acc": ItemScores.of([1, 0], strata=[0, 1])}
    assert items_from_json(items_to_json(items)) == items
    with pytest.raises(ValueError, match="weights has 1 entries for 2 values"):
        ItemScores.of([1, 2], weights=[1])
    with pytest.raises(ValueError, match="transform must be one of"):
        ItemScores.of([1], transform="log")
    with pytest.raises(ValueError, match="at least one item"):
        ItemScores.of([])


def test_consistency_check_catches_items_that_do_not_give_the_value() -> None:
    check_consistent({"edit_success": 0.5}, {"edit_success": ItemScores.of([1, 0])})
    with pytest.raises(ValueError, match="give 0.5, the evaluator reported 0.6"):
        check_consistent({"edit_success": 0.6}, {"edit_success": ItemScores.of([1, 0])})
    scores = Scores.from_items({"edit_success": ItemScores.of([1, 0])}, extra={"sparsity": 0.5})
    assert dict(scores) == {"edit_success": 0.5, "sparsity": 0.5}


def test_evaluation_results_keep_items_and_older_results_without_them_are_recomputed(tmp_path: Path) -> None:
    """Real store, tiny model: every evaluator that reads data stores its items; a result without them is redone."""
    from shared.execution import evaluation_config
    from shared.model_tasks import data_for, evaluate_model, prepare_base_model
    from shared.store import open_store, result_key

    store_uri = str(tmp_path / "store")
    base, _ = prepare_base_model("builtin:tiny-random", store_uri)
    fields = {"num_edits": 3}
    options = {"batch_size": 8, "limit": 5}
    out = evaluate_model(base, ["edit", "utility", "perplexity", "compression"], fields, options)
    store = open_store(store_uri)
    data = data_for(fields)
    keys = {e: result_key(base.key, e, evaluation_config(e, data, options)) for e in out}
    for evaluator in ("edit", "utility", "perplexity"):
        doc = store.get_json(keys[evaluator])
        items = items_from_json(doc["items"])
        assert set(items) == set(doc["criteria"])
        for criterion, scores in items.items():
            assert scores.value() == pytest.approx(doc["criteria"][criterion], rel=1e-9)
    assert len(items_from_json(store.get_json(keys["edit"])["items"])["edit_success"]) == 3
    assert len(items_from_json(store.get_json(keys["utility"])["items"])["utility_acc"]) == 5
    assert "items" not in store.get_json(keys["compression"])

    # a result stored before items were kept: same key, no items -> computed again, now with items
    old = store.get_json(keys["edit"])
    store.put_json(keys["edit"], {k: v for k, v in old.items() if k != "items"} | {"seconds": -1.0})
    again = evaluate_model(base, ["edit"], fields, options)
    redone = store.get_json(keys["edit"])
    assert redone["seconds"] >= 0 and "items" in redone
    assert again["edit"] == pytest.approx(out["edit"])


def test_a_report_rebuilt_from_changed_results_is_the_one_fetched(tmp_path: Path) -> None:
    """Reports are keyed by what they hold: same plan, new results -> new key, and the plan's pointer names it.

    (Keyed by the plan alone, the report of a re-run after a data or code change found the earlier report
    committed under its key and was dropped: the driver fetched the stale one.)
    """
    from shared.execution import latest_report_key, report_content_key, report_pointer_key
    from shared.store import open_store

    store = open_store(str(tmp_path / "store"))
    slot = "reports/abc"
    keys = []
    for text in ("composition,edit_success\nft,0.5\n", "composition,edit_success\nft,0.9\n"):
        folder = tmp_path / f"r{len(keys)}"
        folder.mkdir()
        (folder / "results.csv").write_text(text)
        key = report_content_key(slot, folder)
        store.put_checkpoint(key, folder, {"spec_name": "x"})
        store.put_json(report_pointer_key(slot), {"key": key})
        keys.append(key)
    assert keys[0] != keys[1] and all(k.startswith(slot + "-") for k in keys)
    assert latest_report_key(str(tmp_path / "store"), slot) == keys[1]
    folder, _ = store.get_checkpoint(latest_report_key(str(tmp_path / "store"), slot))
    assert "0.9" in (folder / "results.csv").read_text()
