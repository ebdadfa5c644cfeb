import threading

import pytest

from lowbit.threadflag import ThreadFlag


def test_flag_is_on_only_inside_and_only_in_its_thread():
    flag = ThreadFlag()
    seen = []
    with flag.on():
        assert flag
        with flag.on():
            assert flag
        assert flag  # the inner exit restores the outer state
        other = threading.Thread(target=lambda: seen.append(bool(flag)))
        other.start()
        other.join()
    assert not flag and seen == [False]
    with pytest.raises(KeyError), flag.on():
        raise KeyError("boom")
    assert not flag
