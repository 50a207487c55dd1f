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
