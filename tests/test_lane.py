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


@pytest.fixture
def four_threads():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("ending", ["rest", "close", "failure"])
def test_split_threads_share_them_out_while_both_compute_and_give_them_back(four_threads, ending):
    """Two each while the flow's thread computes beside the lane; the lane takes all four once the flow waits for
    it; the flow's thread has its four back however the lane ends."""
    import torch

    both = threading.Event()
    counts = []

    def work():
        counts.append(torch.get_num_threads())
        yield 1
        both.wait(10)
        counts.append(torch.get_num_threads())
        yield 2
        counts.append(torch.get_num_threads())
        if ending == "failure":
            raise ValueError("stop here")
        yield 3

    lane = Lane(work, name="lane-test", split_threads=True)
    assert torch.get_num_threads() == 2  # the flow's share
    if ending == "close":
        both.set()
        lane.close()
    else:
        items = lane.rest()  # the flow waits from here: the lane takes all four at its next item
        both.set()
        if ending == "failure":
            with pytest.raises(ValueError):
                list(items)
        else:
            assert list(items) == [1, 2, 3]
        lane.close()
        assert counts[0] == 2 and counts[-1] == 4  # the lane's share, then all of them once the flow waits
    assert torch.get_num_threads() == 4


def test_without_split_threads_nothing_changes(four_threads):
    import torch

    counts = []

    def work():
        counts.append(torch.get_num_threads())
        yield 1

    lane = Lane(work, name="lane-test")
    assert torch.get_num_threads() == 4
    assert list(lane.rest()) == [1]
    lane.close()
    assert counts == [4] and torch.get_num_threads() == 4
