"""A tensor that feeds several quantized layers is read once per batch on the device path:
the other layers copy the counts (quantlab.statistics, _DeviceAccumulator._same_as). The
statistics must equal counting every layer's input on its own, whatever the data flow does."""
import pytest
import torch

import quantlab.statistics as statistics
from quantlab.statistics import HistogramCollector, flush_all


def batches(seed, n=4, scale_growth=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.relu(torch.randn(2, 64, 9, 9, generator=g)) * (1.5 ** i if scale_growth else 1.0) for i in range(n)]


def stats_of(collector):
    s = collector.stats()
    return None if s is None else (s.amax, s.bin_width, s.counts.tolist())


def alone(inputs):
    c = HistogramCollector(256, sync_free=True)
    for x in inputs:
        c.update(x.clone())  # a copy: never the same object as another layer's
    return stats_of(c)


@pytest.fixture
def counted(monkeypatch):
    """How many batches each accumulator actually counted (not copied)."""
    calls = []
    original = statistics._DeviceAccumulator._update_torch_ops

    def spy(self, x):
        calls.append(id(self))
        return original(self, x)

    monkeypatch.setattr(statistics._DeviceAccumulator, "_update_torch_ops", spy)
    return calls


def run(feeds, num_layers):
    """``feeds``: per batch, the (layer, tensor) calls in order. Returns each layer's statistics."""
    layers = [HistogramCollector(256, name=f"layer{k}", sync_free=True) for k in range(num_layers)]
    for calls in feeds:
        for layer, x in calls:
            layers[layer].update(x)
    flush_all(layers)
    return layers


def test_three_layers_on_one_tensor_read_it_once(counted):
    xs = batches(0)
    layers = run([[(0, x), (1, x), (2, x)] for x in xs], 3)
    assert len(counted) == len(xs)  # one layer counted, two copied
    assert [stats_of(c) for c in layers] == [alone(xs)] * 3
    assert [c.num_batches for c in layers] == [4, 4, 4]


def test_a_layer_whose_input_diverges_counts_its_own_from_then_on(counted):
    xs, ys = batches(1), batches(2)
    feeds = [[(0, x), (1, x if i < 2 else y)] for i, (x, y) in enumerate(zip(xs, ys))]
    first, second = run(feeds, 2)
    assert len(counted) == 2 + 2 * 2
    assert stats_of(first) == alone(xs)
    assert stats_of(second) == alone(xs[:2] + ys[2:])
    # ... and returning to the shared tensor later does not copy again (its state differs now)
    counted.clear()
    feeds = [[(0, x), (1, x if i != 1 else y)] for i, (x, y) in enumerate(zip(xs, ys))]
    first, second = run(feeds, 2)
    assert len(counted) == 1 + 2 * 3
    assert stats_of(second) == alone([xs[0], ys[1], xs[2], xs[3]])


def test_order_of_the_layers_may_change_between_batches():
    xs = batches(3)
    feeds = [[(0, x), (1, x)] if i % 2 else [(1, x), (0, x)] for i, x in enumerate(xs)]
    assert [stats_of(c) for c in run(feeds, 2)] == [alone(xs)] * 2


def test_an_in_place_change_between_the_layers_is_counted_again(counted):
    xs = batches(4)
    layers = [HistogramCollector(256, sync_free=True) for _ in range(2)]
    seen_by_second = []
    for x in xs:
        layers[0].update(x)
        x.mul_(3.0)  # e.g. an in-place activation between the two consumers
        layers[1].update(x)
        seen_by_second.append(x)
    flush_all(layers)
    assert len(counted) == 2 * len(xs)
    assert stats_of(layers[1]) == alone(seen_by_second)


def test_a_layer_called_twice_with_the_same_tensor_counts_it_twice():
    xs = batches(5)
    layers = run([[(0, x), (0, x), (1, x)] for x in xs], 2)
    twice = alone([x for x in xs for _ in range(2)])
    assert stats_of(layers[0]) == twice
    assert stats_of(layers[1]) == alone(xs)


def test_a_late_joiner_counts_its_own():
    xs = batches(6)
    feeds = [[(0, x)] + ([(1, x)] if i >= 1 else []) for i, x in enumerate(xs)]
    first, second = run(feeds, 2)
    assert stats_of(first) == alone(xs) and stats_of(second) == alone(xs[1:])


def test_a_second_pass_starts_over(counted):
    xs = batches(7)
    layers = [HistogramCollector(256, sync_free=True) for _ in range(2)]
    for x in xs:
        layers[0].update(x)
        layers[1].update(x)
    flush_all(layers)
    for layer in layers:  # a new pass on reused device states (as q.collect() does)
        fresh = HistogramCollector(256, sync_free=True)
        fresh.reuse_device_state(layer)
        layers[layers.index(layer)] = fresh
    ys = batches(8)
    for y in ys:
        layers[0].update(y)
        layers[1].update(y)
    flush_all(layers)
    assert [stats_of(c) for c in layers] == [alone(ys)] * 2


def test_non_finite_values_are_reported_for_every_layer_that_saw_them():
    from quantlab.errors import NonFiniteActivationError

    xs = batches(9)
    xs[2][0, 0, 0, 0] = float("nan")
    layers = run([[(0, x), (1, x)] for x in xs[:2]], 2)  # fine so far
    assert all(c.num_batches == 2 for c in layers)
    layers = [HistogramCollector(256, name=f"layer{k}", sync_free=True) for k in range(2)]
    for x in xs:
        layers[0].update(x)
        layers[1].update(x)
    for layer in layers:
        with pytest.raises(NonFiniteActivationError, match=layer.name):
            layer.flush()


def test_inference_tensors_are_never_shared(counted):
    """An inference tensor has no version counter (an in-place change would go unseen): each layer counts it."""
    with torch.inference_mode():
        xs = batches(10)
        layers = run([[(0, x), (1, x)] for x in xs], 2)
    assert len(counted) == 2 * len(xs)
    assert [stats_of(c) for c in layers] == [alone([x.clone() for x in xs])] * 2


def test_a_source_read_mid_pass_starts_another_history():
    """Reading a layer's statistics mid-pass empties its device state (reset): a layer that copied
    it before must not copy it again, nor may an old table entry for a tensor it counted before."""
    x0, x1, x2 = batches(11, n=3)
    a, b = HistogramCollector(256, sync_free=True), HistogramCollector(256, sync_free=True)
    a.update(x0)
    b.update(x0)  # copies a
    _ = a.amax  # read mid-pass: a's device state is folded in and emptied
    a.update(x1)
    a.update(x2)
    b.update(x2)  # a's state holds x1 + x2 now; b must count x2 itself
    flush_all([a, b])
    assert stats_of(b) == alone([x0, x2])
    assert stats_of(a) == alone([x0, x1, x2])

    x3, x4 = batches(12, n=2)
    a, b = HistogramCollector(256, sync_free=True), HistogramCollector(256, sync_free=True)
    a.update(x3)
    _ = a.amax  # the entry for x3 says "a, after one batch": true again below, for another tensor
    a.update(x4)
    b.update(x3)
    flush_all([a, b])
    assert stats_of(b) == alone([x3])


def test_no_sharing_inside_a_cuda_graph_capture(counted, monkeypatch):
    """Inside a capture a copy would be replayed whether or not the states are still equal then, so
    every layer counts its own batch (here the capture is simulated on the CPU)."""
    xs = batches(13, n=3)
    a, b = HistogramCollector(256, sync_free=True), HistogramCollector(256, sync_free=True)
    a.update(xs[0])
    b.update(xs[0])  # eager: copied
    assert len(counted) == 1
    recorded = []
    monkeypatch.setattr(statistics._CAPTURE, "recorded", recorded)
    monkeypatch.setattr(statistics, "_capturing_on", lambda device: True)
    monkeypatch.setattr(statistics.histogram_cuda, "current_index", lambda: -1)  # the CPU's "device index"
    for acc in (a._device, b._device):  # let the CPU state take the "captured" path: the fused kernel's launch
        monkeypatch.setattr(acc, "_kernels", type("K", (), {"enqueue": lambda self, *args: None})())
    with pytest.raises(statistics.NotCapturable):  # not what the fused kernel reads (not contiguous): refused
        a.update(xs[1].view(-1)[::2])
    a.update(xs[1])
    b.update(xs[1])  # no copy: b would have raised or counted, never copied
    assert [acc for acc, _ in recorded] == [a._device, b._device]
    assert b._device.mirror_of is None
