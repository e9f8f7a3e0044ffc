"""Which failed tasks Prefect retries: an outage or a crash may pass on a second try; an error
that names something the user must fix fails once (tasks.is_transient)."""

from __future__ import annotations

import pytest
from prefect.states import Failed

from services.dvc import DvcError
from services.labelstudio import LabelStudioError, LabelStudioRefused, LabelStudioUnavailable
from tasks import is_transient
from xbl.errors import ConfigError, DataError


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (LabelStudioUnavailable("not reachable"), True),
        (ConnectionError("reset by peer"), True),
        (DvcError("dvc push failed"), True),
        (LabelStudioError("HTTP 502"), True),
        (LabelStudioRefused("rejected the API token (HTTP 401)"), False),
        (ConfigError("feedback.method is 'rrrr'"), False),
        (DataError("row 3: unreadable image"), False),
    ],
)
def test_only_what_may_pass_on_a_second_try_is_retried(error, retried):
    assert is_transient(None, None, Failed(data=error)) is retried
