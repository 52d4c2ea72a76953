"""The layer-table parser against a real table captured from rknn-toolkit2 2.5.0.

The fixture is the table the toolkit printed for light_inception_v2 on rk3588,
float16, no overrides: 113 rows including the input and output operators, seven
AveragePool layers on the CPU.
"""

from pathlib import Path

from pipeline.layer_table import parse_layer_table, summarize

FIXTURE = Path(__file__).parent / "fixtures" / "layer_table_inception_v2_rk3588.log"


def test_parses_every_row_of_a_real_table():
    layers = parse_layer_table(FIXTURE.read_text())
    assert [layer["id"] for layer in layers] == list(range(113))
    first_conv = layers[1]
    assert first_conv["op_type"] == "ConvRelu"
    assert first_conv["target"] == "NPU"
    assert first_conv["input_shapes"] == [[1, 3, 224, 224], [64, 3, 7, 7], [64]]
    assert first_conv["output_shapes"] == [[1, 64, 112, 112]]
    assert first_conv["cycles"] == {"ddr": 82740, "npu": 2458624, "total": 2458624}
    assert (first_conv["origin_op"], first_conv["node"]) == ("Conv", "n0")
    assert layers[-1]["op_type"] == "OutputOperator" and layers[-1]["output_shapes"] is None


def test_summary_counts_cpu_fallbacks_but_not_io_operators():
    summary = summarize(parse_layer_table(FIXTURE.read_text()))
    assert summary["layers"] == 111
    assert (summary["npu"], summary["cpu"]) == (104, 7)
    assert summary["cpu_by_op"] == {"AveragePool": 7}
    assert {layer["node"] for layer in summary["cpu_layers"]} == {"n65", "n116", "n204", "n255", "n306", "n357", "n445"}
    assert summary["total_cycles"] > 0


def test_last_table_wins_and_missing_table_is_empty():
    text = FIXTURE.read_text()
    assert parse_layer_table("I rknn building ...\nE build failed\n") == []
    doubled = text.replace("AveragePool:n65", "AveragePool:first") + "\n" + text
    assert parse_layer_table(doubled)[6]["node"] == "n65"


def test_ansi_colour_codes_are_ignored():
    coloured = "\n".join(f"\x1b[0m{line}" if " NPU " in line else line for line in FIXTURE.read_text().splitlines())
    assert summarize(parse_layer_table(coloured))["npu"] == 104


def test_a_row_with_an_empty_full_name_is_kept():
    lines = FIXTURE.read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if "Conv:n8 " in line)
    lines[row] = lines[row].replace("Conv:n8", "       ")
    layers = parse_layer_table("\n".join(lines))
    assert len(layers) == 113
    assert layers[3]["full_name"] == "" and layers[3]["node"] == "" and layers[3]["target"] == "NPU"
