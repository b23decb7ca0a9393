"""What ``quantlab compare`` prints equals what the run store holds (units in every header)."""
from quantlab.cli._compare_tables import print_compare_tables
from quantlab.cli._runs_common import fmt
from quantlab.evaluation import present
from quantlab.jobs.compare import run_compare
from quantlab.jobs.deployment import DeploymentOptions
from quantlab.runtimes.tensorrt.loader import tensorrt_available
from quantlab.store import RunStore


def _table(lines, first_header):
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header}"))
    headers = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(headers, (c.strip() for c in line.strip("|").split("|")))))
    return headers, rows


def test_printed_tables_show_the_stored_numbers(planted, tmp_path, capsys):
    model, calib, evaluation = planted
    store = RunStore(tmp_path / "runs.sqlite")
    result = run_compare(model, calib, evaluation, calibrators="max", layer_batches=0, store=store,
                         deployment=DeploymentOptions(threads=1, warmup=1, repeats=2))
    print_compare_tables(result)
    lines = capsys.readouterr().out.splitlines()
    headers, rows = _table(lines, "configuration | n")
    assert headers[:6] == ["configuration", "n", "top1 (%)", "95% CI (%)", "Δ vs FP32 (points)", "p vs FP32"]
    assert present.PYTORCH_SECONDS in headers and "seconds" not in headers
    stored = {present.configuration_label(r["precision"], r["calibrator"], r["source"]): r
              for r in store.results(result.run_id) if r["metric"] == "top1"}
    assert [r["configuration"] for r in rows] == ["FP32", "FP16", "INT8 max"]
    for row in rows:
        s = stored[row["configuration"]]
        assert row["n"] == fmt(s["n"]) and row["top1 (%)"] == fmt(s["value"])
        assert row["95% CI (%)"] == f"{fmt(s['ci_low'])} – {fmt(s['ci_high'])}"
        assert row["noise"] == present.noise_verdict(s)
    assert rows[2]["noise"] == "outside noise" and rows[0]["noise"] == "reference"
    fid_headers, fid_rows = _table(lines[lines.index(next(l for l in lines if l.startswith("Output fidelity"))) + 1:], "configuration")
    assert fid_headers == ["configuration", "n", "top-1 agreement (%)", "max abs error", "max rel error", "1 − cos", "KL (nats)"]
    stored_fid = {present.configuration_label(r["precision"], r["calibrator"], r["source"]): r for r in store.fidelity(result.run_id)}
    for row in fid_rows:
        assert row["max abs error"] == fmt(stored_fid[row["configuration"]]["max_abs_error"], 3)
    dep_headers, dep_rows = _table(lines[lines.index(next(l for l in lines if l.startswith("Deployment cost"))) + 1:], "configuration")
    assert dep_headers[:2] == ["configuration", "size (MB)"] and dep_headers[-2:] == ["timing source", "TensorRT"]
    assert any(h.startswith("batch 1 median / min (ms)") for h in dep_headers)
    stored_dep = [r for r in store.deployment(result.run_id) if r["status"] == "measured" and r["batch_size"] == 1]
    for row in dep_rows:
        s = next(d for d in stored_dep if present.configuration_label(d["precision"], d["calibrator"], d["source"]) == row["configuration"])
        assert row["batch 1 median / min (ms)"] == f"{fmt(s['latency_ms_median'], 3)} / {fmt(s['latency_ms_min'], 3)}"
        assert row["timing source"] == s["label"] and row["TensorRT"] == ("not measured" if tensorrt_available() else "not installed")


def test_the_report_shows_the_same_fidelity_and_cost(planted, tmp_path):
    from quantlab.evaluation.report import _sections

    model, calib, evaluation = planted
    result = run_compare(model, calib, evaluation, calibrators="max", precisions="fp32,int8", layer_batches=0, store=False,
                         deployment=DeploymentOptions(threads=1, warmup=1, repeats=1))
    data = {"results": {"fidelity": [r.to_dict() for r in result.fidelity], "deployment": [r.to_dict() for r in result.deployment]},
            "sensitivity": {}, "mixed": {}}
    sections = {heading: (headers, rows) for heading, headers, rows, _ in _sections(data)}
    headers, rows = sections["Output fidelity vs FP32"]
    assert rows == [["INT8 max", str(result.fidelity[0].n), f"{result.fidelity[0].top1_agreement:.4g}",
                     f"{result.fidelity[0].max_abs_error:.4g}", f"{result.fidelity[0].max_rel_error:.4g}",
                     f"{result.fidelity[0].one_minus_cosine:.4g}", f"{result.fidelity[0].kl_divergence:.4g}"]]
    headers, rows = sections["Deployment cost (exported ONNX files)"]
    assert [r[0] for r in rows] == ["FP32", "INT8 max"] and headers[-2:] == ["timing source", "TensorRT"]
    fp32_batch1 = next(c for c in result.deployment if c.precision == "fp32" and c.batch_size == 1 and c.status == "measured")
    assert rows[0][2] == f"{fp32_batch1.latency_ms_median:.4g} / {fp32_batch1.latency_ms_min:.4g}"


def test_a_hand_edited_results_file_is_refused_field_by_field(planted, tmp_path):
    import json

    import pytest

    from quantlab.jobs.runs import read_results
    from quantlab.errors import FileFormatError

    model, calib, evaluation = planted
    run_compare(model, calib, evaluation, calibrators="max", precisions="fp32,int8", layer_batches=0, store=False,
                run_dir=tmp_path / "run", deployment=DeploymentOptions(threads=1, warmup=0, repeats=1))
    path = tmp_path / "run" / "results.json"
    data = read_results(tmp_path / "run")
    original = path.read_text()
    assert data["fidelity"] and data["deployment"] and data["rows"][0]["n"] > 0
    for name, key, bad in (("fidelity", "max_abs_error", "big"), ("deployment", "batch_size", 0), ("rows", "within_noise", "yes")):
        edited = json.loads(original)
        edited[name][0][key] = bad
        path.write_text(json.dumps(edited))
        with pytest.raises(FileFormatError, match=rf"{name}\[0\].*{key}"):
            read_results(tmp_path / "run")
