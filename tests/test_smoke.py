import concurrent.futures as cf

import pytest
from tasks import add, fail, inc

import meshpool


def test_submit_result(ex):
    assert ex.submit(inc, 1).result(timeout=10) == 2


def test_future_is_stdlib_future(ex):
    fut = ex.submit(inc, 1)
    assert isinstance(fut, cf.Future)
    assert isinstance(fut, meshpool.Future)
    done, _ = cf.wait([fut], timeout=10)
    assert fut in done


def test_dependency(ex):
    a = ex.submit(inc, 1)
    b = ex.submit(add, a, [a, {"k": a}][0])
    assert b.result(timeout=10) == 4


def test_error_type(ex):
    with pytest.raises(ValueError, match="boom"):
        ex.submit(fail).result(timeout=10)
