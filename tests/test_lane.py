"""A Lane runs work in its own thread and hands its items over in order; a failure there is raised here; closing it
stops the work and ends the thread."""
import threading
import time

import pytest

from quailora_app.flows.lane import Lane


def test_items_come_in_order_and_the_thread_ends():
    seen_in = []

    def work():
        for i in range(5):
            seen_in.append(threading.current_thread().name)
            yield i

    lane = Lane(work, name="lane-test")
    assert list(lane.rest()) == list(range(5))
    assert list(lane.rest()) == [] and list(lane.ready()) == []
    lane.close()
    assert set(seen_in) == {"lane-test"}  # the work ran in the lane's thread
    assert not [t for t in threading.enumerate() if t.name == "lane-test"]


def test_ready_does_not_wait_and_the_rest_does():
    go = threading.Event()

    def work():
        yield "first"
        go.wait(10)
        yield "second"

    lane = Lane(work, name="lane-test")
    deadline = time.monotonic() + 10
    got = []
    while not got and time.monotonic() < deadline:
        got += list(lane.ready())
    assert got == ["first"]
    assert list(lane.ready()) == []  # "second" waits for go: ready() returns at once
    go.set()
    assert list(lane.rest()) == ["second"]
    lane.close()


def test_a_failure_in_the_lane_is_raised_where_the_flow_looks():
    def work():
        yield 1
        raise ValueError("the adapter does not fit")

    lane = Lane(work, name="lane-test")
    with pytest.raises(ValueError, match="does not fit"):
        list(lane.rest())
    lane.close()


def test_close_stops_work_that_checks_stopping():
    started, finished, lanes = threading.Event(), [], []

    def work():
        started.set()
        while not lanes:  # the Lane object is known to the work once its constructor has returned
            time.sleep(0.01)
        lane = lanes[0]
        try:
            while not lane.stopping():
                time.sleep(0.01)
            yield "never taken"
        finally:
            finished.append(True)

    lane = Lane(work, name="lane-test")
    lanes.append(lane)
    assert started.wait(10)
    lane.close()
    assert finished == [True]
    assert not [t for t in threading.enumerate() if t.name == "lane-test"]
