"""The dataset-distillation rows of published.yaml added for issue 25: a few figures as their sources print them,
every source resolves, and every row outside the ConvNet-3 tables names its evaluation network."""
import copy

import pytest

from kdzoo.bench import published
from kdzoo.bench.published import load, lookup, reference
from kdzoo.errors import ConfigError


def test_figures_read_off_the_authors_readmes():
    # FTD README results table, CIFAR-10 / CIFAR-100 / Tiny-ImageNet, and its "real dataset" row
    assert [lookup("ftd", "cifar10", ipc=i) for i in (1, 10, 50)] == [46.8, 66.6, 73.8]
    assert lookup("ftd", "cifar100", ipc=50) == 50.7 and lookup("ftd", "tinyimagenet", ipc=10) == 24.5
    assert lookup("full_dataset", "cifar10", ipc=10) == 84.8
    # SRe2L README, R18 column
    assert [lookup("sre2l", "imagenet1k", ipc=i) for i in (10, 50, 100, 200)] == [21.3, 46.8, 52.8, 57.0]
    assert lookup("sre2l", "tinyimagenet", ipc=100) == 49.7
    # CV-DD README, ResNet18 columns (its own and, quoted, RDED's)
    assert lookup("cv_dd", "imagenet1k", ipc=10) == 46.0 and lookup("cv_dd", "cifar10", ipc=50) == 70.1
    assert lookup("rded", "tinyimagenet", ipc=50) == 58.2
    # INFER README Tables 1-2
    assert lookup("infer", "cifar100", ipc=100) == 66.3 and lookup("infer_dyn", "imagenet1k", ipc=50) == 55.6


def test_sources_name_where_each_figure_was_read():
    assert "RDED README" in reference("rded", "imagenet1k", ipc=10).source  # the README's "42%"
    assert reference("rded", "imagenet1k", ipc=50).source.startswith("secondary")  # the CV-DD quote
    assert "results.png" in reference("ftd", "cifar10", ipc=1).source
    # unverified figures stay null: no value, never a guess
    assert lookup("dc", "cifar100", ipc=50) is None and lookup("cv_dd", "imagenet1k", ipc=200) is None


def test_every_condensation_source_resolves_and_rows_name_their_network():
    data = load()
    for dataset, table in data["condensation"].items():
        width = len(table["ipc"])
        for method, row in table["rows"].items():
            sources = row["source"] if isinstance(row["source"], list) else [row["source"]] * width
            assert len(row["values"]) == width == len(sources), (dataset, method)
            assert set(sources) <= set(data["sources"]), (dataset, method)
            assert isinstance(row.get("model", ""), str)
            if dataset in ("tinyimagenet", "imagenet1k") or method in ("rded", "cv_dd", "infer", "sre2l"):
                assert row.get("model"), f"{dataset}.{method} has no evaluation network"


def test_a_row_with_an_unknown_source_fails_the_check():
    data = copy.deepcopy(load())
    data["condensation"]["imagenet1k"]["rows"]["sre2l"]["source"] = "NOPE"
    with pytest.raises(ConfigError, match="condensation.imagenet1k.rows.sre2l: unknown source 'NOPE'"):
        published._check(data)


def test_resnet_rows_carry_their_network_and_stay_out_of_convnet_comparisons():
    from kdzoo.bench.published import published_accuracy

    rded = reference("rded", "cifar10", ipc=10)
    assert rded.value == 37.1 and rded.model == "resnet18"
    assert published_accuracy("rded", "cifar10", 10) is None  # a ConvNet-3 run is not put beside a ResNet-18 figure
    assert published_accuracy("dm", "cifar10", 10) == 48.9 and reference("dm", "cifar10", ipc=10).model is None


def test_released_tinyclip_models_are_in_the_data_file():
    from kdzoo.bench.published import clip_zero_shot
    rows = clip_zero_shot("imagenet1k")
    value, what, source = rows["tinyclip_vit_8m_16_text_3m"]
    assert value == 41.1 and "manual inheritance" in what and "TinyCLIP" in source  # README: ViT-8M/16 41.1 %
    assert rows["tinyclip_auto_vit_45m_32_text_18m"][0] == 61.4
    assert clip_zero_shot("no_such_dataset") == {}


def test_clip_tables_of_zscl_froster_and_dho_are_in_the_data_file():
    from kdzoo.bench.published import clip_table
    what, columns, rows = clip_table("zscl_mtil_order1")
    assert columns == ["transfer", "avg", "last"] and "MTIL" in what
    assert rows["zscl"][0] == [68.1, 75.4, 83.6] and "ZSCL" in rows["zscl"][1]  # results.ipynb, Table 3
    assert rows["continual_finetune"][0] == [44.6, 55.9, 77.3]
    _, columns, rows = clip_table("froster_base_to_novel")
    values = dict(zip(columns, rows["froster"][0]))
    assert (values["k400_base"], values["k400_novel"], values["k400_hm"]) == (77.8, 64.3, 70.4)  # README Table 1
    assert clip_table("dho_imagenet")[2]["dho_vit_b16"][0] == [81.6, 82.8]
    assert clip_table("no_such_table") == ("", [], {})
