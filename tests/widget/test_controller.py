import threading
import time

from nbattr.widget.controller import Controller


class Recorder:
    def __init__(self, delay=0.0, fail=()):
        self.delay, self.fail = delay, set(fail)
        self.published = []
        self.states = []
        self.lock = threading.Lock()

    def compute(self, key):
        time.sleep(self.delay)
        if key in self.fail:
            raise RuntimeError(f"boom {key}")
        return f"payload {key}"

    def publish(self, o):
        with self.lock:
            self.published.append(o)

    def on_state(self, state, key):
        self.states.append((state, key))


def make(**kw):
    r = Recorder(**kw)
    return r, Controller(r.compute, r.publish, r.on_state)


def test_request_computes_off_thread_and_publishes():
    r, c = make(delay=0.05)
    t0 = time.perf_counter()
    c.request("a")
    assert time.perf_counter() - t0 < 0.03  # request returns at once
    assert c.wait(5)
    assert [o.key for o in r.published] == ["a"]
    assert r.published[0].payload == "payload a" and not r.published[0].cached
    assert ("computing", "a") in r.states
    c.close()


def test_cache_hit_publishes_without_computing():
    r, c = make()
    c.request("a")
    c.wait(5)
    c.request("b")
    c.wait(5)
    c.request("a")
    c.wait(5)
    assert c.computed == ["a", "b"]
    assert r.published[-1].key == "a" and r.published[-1].cached
    c.close()


def test_supersession_fifty_rapid_switches_end_on_the_last():
    r, c = make(delay=0.02)
    keys = [f"k{i}" for i in range(50)]
    for k in keys:
        c.request(k)
    assert c.wait(10)
    assert r.published[-1].key == "k49"
    assert c.last.key == "k49"
    # stale results are never published after a newer one: published keys are in request order
    order = [int(o.key[1:]) for o in r.published]
    assert order == sorted(order)
    assert len(c.computed) <= 3  # the one running, maybe one pending, the last
    c.close()


def test_error_is_published_and_the_controller_stays_usable():
    r, c = make(fail={"bad"})
    c.request("bad")
    c.wait(5)
    assert r.published[-1].error == "RuntimeError: boom bad"
    assert not c.cached("bad")  # errors are not cached
    c.request("good")
    c.wait(5)
    assert r.published[-1].error is None and r.published[-1].payload == "payload good"
    c.close()


def test_publish_failure_does_not_kill_the_worker(capsys):
    calls = []

    def publish(o):
        calls.append(o.key)
        if o.key == "a":
            raise ValueError("display broke")

    c = Controller(lambda k: k, publish)
    c.request("a")
    c.wait(5)
    c.request("b")
    c.wait(5)
    assert calls == ["a", "b"]
    c.close()


# -- prefetch ---------------------------------------------------------------------------------
class Prefetcher:
    """``prefetch(key, stop)`` returning the keys ``key + "/1"``, ``key + "/2"``; may block or fail."""

    def __init__(self, gate=None, fail=False, delay=0.0):
        self.gate, self.fail, self.delay = gate, fail, delay
        self.calls = []
        self.started = threading.Event()
        self.saw_stop = []

    def __call__(self, key, stop):
        self.calls.append(key)
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(5)
        time.sleep(self.delay)
        self.saw_stop.append(stop())
        if self.fail:
            raise RuntimeError("prefetch broke")
        return {f"{key}/1": f"payload {key}/1", f"{key}/2": f"payload {key}/2"}


def make_pf(pf, prefetch_after=3.0, **kw):
    r = Recorder(**kw)
    return r, Controller(r.compute, r.publish, r.on_state, prefetch=pf, prefetch_after=prefetch_after)


def test_prefetch_fills_the_cache_without_publishing():
    pf = Prefetcher()
    r, c = make_pf(pf)
    c.request("a")
    assert c.wait(5, prefetch=True)
    assert pf.calls == ["a"] and pf.saw_stop == [False]
    assert [o.key for o in r.published] == ["a"]  # prefetched entries are never published
    assert c.prefetched == ["a/1", "a/2"] and c.get_cached("a/1") == "payload a/1"
    assert r.states[-1] == ("idle", "a")  # the widget shows idle before the prefetch starts
    c.request("a/2")  # a cache hit, published at once on this thread
    assert r.published[-1].key == "a/2" and r.published[-1].cached
    assert r.published[-1].payload == "payload a/2"
    assert c.computed == ["a"]
    c.close()


def test_request_during_prefetch_is_served_right_after_it():
    gate = threading.Event()
    pf = Prefetcher(gate=gate)
    r, c = make_pf(pf)
    c.request("a")
    assert pf.started.wait(5)
    assert c.prefetching and not c.busy  # the shown result is done; the prefetch is background
    c.request("b")  # not cached: waits in the pending slot while the prefetch runs
    c.request("c")  # supersedes b
    gate.set()
    assert c.wait(5)
    assert pf.saw_stop[0] is True  # the prefetch was told a newer request waits
    assert r.published[-1].key == "c" and c.last.key == "c"
    assert "b" not in [o.key for o in r.published]
    assert c.computed == ["a", "c"]
    c.wait(5, prefetch=True)
    c.close()


def test_request_for_a_key_being_prefetched_is_served_from_the_cache():
    gate = threading.Event()
    pf = Prefetcher(gate=gate)
    r, c = make_pf(pf)
    c.request("a")
    assert pf.started.wait(5)
    c.request("a/1")  # what the running prefetch is producing
    gate.set()
    assert c.wait(5)
    assert r.published[-1].key == "a/1" and r.published[-1].cached
    assert c.computed == ["a"]  # not computed twice
    assert pf.calls == ["a"]  # no prefetch after a cache hit
    c.close()


def test_ends_on_the_last_choice_with_prefetch_and_rapid_switches():
    pf = Prefetcher(delay=0.01)
    r, c = make_pf(pf, delay=0.005)
    keys = []
    for i in range(30):
        k = f"k{i % 4}" if i % 3 else f"k{i % 4}/{1 + i % 2}"  # computed keys and prefetched ones
        keys.append(k)
        c.request(k)
        time.sleep(0.004)
    assert c.wait(10)
    assert r.published[-1].key == keys[-1] and c.last.key == keys[-1]
    seqs = [o.seq for o in r.published]
    assert seqs == sorted(seqs)  # never a stale outcome after a newer one
    c.wait(10, prefetch=True)
    c.close()


def test_no_prefetch_after_a_slow_computation_or_an_error():
    pf = Prefetcher()
    r, c = make_pf(pf, prefetch_after=0.01, delay=0.05, fail={"bad"})
    c.request("a")  # took 0.05 s > 0.01 s
    c.wait(5, prefetch=True)
    assert pf.calls == [] and not c.cached("a/1")
    c.prefetch_after = None
    c.request("bad")
    c.wait(5, prefetch=True)
    assert pf.calls == []
    c.request("b")
    c.wait(5, prefetch=True)
    assert pf.calls == ["b"]
    c.close()


def test_prefetch_error_is_recorded_and_not_published():
    pf = Prefetcher(fail=True)
    r, c = make_pf(pf)
    c.request("a")
    assert c.wait(5, prefetch=True)
    assert c.prefetch_errors == ["RuntimeError: prefetch broke"]
    assert [o.error for o in r.published] == [None]
    assert not c.prefetching and not c.cached("a/1")
    c.request("b")  # the worker lives on
    c.wait(5)
    assert r.published[-1].key == "b" and r.published[-1].error is None
    c.close()


def test_a_computed_entry_is_not_replaced_by_a_prefetched_one():
    c = Controller(lambda k: f"computed {k}", lambda o: None,
                   prefetch=lambda key, stop: {"x": "prefetched x"} if key == "a" else {})
    c.request("x")
    c.wait(5, prefetch=True)
    c.request("a")
    c.wait(5, prefetch=True)
    assert c.get_cached("x") == "computed x" and c.prefetched == []
    c.close()


class Chunked(Recorder):
    """A compute that works in engine chunks (run_chunked), each taking ``delay`` seconds."""

    def __init__(self, chunks=20, delay=0.01):
        super().__init__()
        self.chunks, self.chunk_delay = chunks, delay
        self.started = threading.Event()
        self.rows = {}

    def compute(self, key):
        from nbattr.engine.batching import run_chunked

        self.rows[key] = 0

        def work(rows):
            self.started.set()
            time.sleep(self.chunk_delay)
            self.rows[key] += rows.stop - rows.start

        run_chunked(self.chunks, work, batch_size=1)
        return f"payload {key}"


def test_a_superseded_computation_stops_at_its_next_chunk():
    r = Chunked(chunks=200, delay=0.01)  # 2 s if it ran to the end
    c = Controller(r.compute, r.publish, r.on_state)
    c.request("slow")
    assert r.started.wait(5)
    r.chunks = 10  # "next" is short
    t0 = time.perf_counter()
    c.request("next")
    assert c.wait(5)
    assert time.perf_counter() - t0 < 1.0  # "slow" had 2 s of work left
    assert c.cancelled == ["slow"] and c.computed == ["next"]
    assert r.rows["slow"] < 100 and r.rows["next"] == 10
    assert [o.key for o in r.published] == ["next"] and not c.cached("slow")
    assert r.states[-1] == ("idle", "next")
    c.close()


def test_a_cache_hit_also_stops_the_running_computation():
    r = Chunked(chunks=5, delay=0.001)
    c = Controller(r.compute, r.publish, r.on_state)
    c.request("a")
    assert c.wait(5)
    r.chunks, r.chunk_delay = 300, 0.01
    r.started.clear()
    c.request("b")
    assert r.started.wait(5)
    c.request("a")  # cached: published at once, and "b" is no longer wanted
    assert c.wait(5)
    assert c.cancelled == ["b"] and r.published[-1].key == "a" and r.published[-1].cached
    assert r.states[-1] == ("idle", "b")
    c.close()


def test_progress_is_reported_as_a_fraction_and_ends_at_one():
    r = Chunked(chunks=30, delay=0.01)
    seen = []
    c = Controller(r.compute, r.publish, r.on_state, on_progress=seen.append)
    c.request("a")
    assert c.wait(5)
    assert seen[-1] == 1.0 and seen == sorted(seen) and 0 < seen[0] < 1
    assert len(seen) < 30  # throttled: at most one report per PROGRESS_EVERY seconds (and the end)
    c.close()


def test_a_prefetch_that_gives_way_is_not_an_error():
    from nbattr.engine import Cancelled

    r = Recorder()

    def prefetch(key, stop):
        raise Cancelled("gave way")

    c = Controller(r.compute, r.publish, r.on_state, prefetch=prefetch)
    c.request("a")
    assert c.wait(5, prefetch=True)
    assert c.prefetch_errors == [] and c.pending() is None
    c.close()
    assert c.closed
