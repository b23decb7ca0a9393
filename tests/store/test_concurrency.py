"""A reader process/thread reads while another process writes: no errors, only whole transactions."""
import multiprocessing as mp
import threading
import time

from quantlab.store import RunStore

ROWS_PER_BATCH = 7
BATCHES = 40


def _writer(path, run_id, started):
    store = RunStore(path)
    started.set()
    for b in range(BATCHES):
        store.add_results(run_id, [
            {"precision": "int8", "calibrator": f"c{b}", "metric": "top1", "value": float(i), "delta": None, "seconds": 0.01}
            for i in range(ROWS_PER_BATCH)
        ])
        store.add_layer_stats(run_id, [{"calibrator": f"c{b}", "layer": f"layer{i}", "sqnr_db": 30.0, "cosine": 0.99} for i in range(3)])
        store.set_status(run_id, "running", progress=(b + 1) / BATCHES)
    store.set_status(run_id, "done")


def test_reader_sees_whole_transactions_while_a_process_writes(tmp_path):
    path = tmp_path / "runs.sqlite"
    store = RunStore(path)
    run_id = store.create_run("compare", model="m")
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    writer = ctx.Process(target=_writer, args=(str(path), run_id, started))
    writer.start()
    assert started.wait(60)
    seen, errors = [], []

    def read_loop():
        reader = RunStore(path, busy_timeout=10)
        mine = []
        try:
            while True:
                results = reader.results(run_id)
                layers = reader.layer_stats(run_id)
                status = reader.get_run(run_id)["status"]
                mine.append(len(results))
                assert mine == sorted(mine), "a reader saw rows disappear"
                # add_results is one transaction: a reader never sees part of a batch.
                assert len(results) % ROWS_PER_BATCH == 0, len(results)
                assert len(layers) % 3 == 0, len(layers)
                if status == "done":
                    break
                time.sleep(0.001)
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)
        seen.extend(mine)

    threads = [threading.Thread(target=read_loop) for _ in range(2)]
    for t in threads:
        t.start()
    writer.join(120)
    for t in threads:
        t.join(120)
    assert writer.exitcode == 0
    assert errors == []
    assert len(store.results(run_id)) == ROWS_PER_BATCH * BATCHES
    assert any(0 < n < ROWS_PER_BATCH * BATCHES for n in seen), "the reader never overlapped the writer"


def test_two_writer_threads_interleave_safely(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    ids = []
    lock = threading.Lock()

    def create(n):
        for _ in range(n):
            run_id = store.create_run("calibrate", model="m")
            store.add_results(run_id, [{"precision": "fp32", "metric": "top1", "value": 1.0}])
            with lock:
                ids.append(run_id)

    threads = [threading.Thread(target=create, args=(10,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(set(ids)) == 30
    assert len(store.list_runs("calibrate")) == 30
    assert all(len(store.results(i)) == 1 for i in ids)
