"""cxr.core.env_settings: the pieces the ingestion and worker settings modules share."""

from __future__ import annotations

import pytest

from cxr.core.env_settings import Setting, build_parser, is_redis_url, non_negative, positive

pytestmark = pytest.mark.unit

SETTINGS = (
    Setting("max_concurrent", "CXR_MAX_CONCURRENT", positive(int), "in-flight calls"),
    Setting("test_delay_s", "CXR_TEST_DELAY_S", non_negative(float), "TEST ONLY", cli=False),
)


def test_one_flag_per_cli_setting_named_after_the_field_with_its_variable_in_the_help() -> None:
    parser = build_parser("prog", "what it is", SETTINGS)
    assert SETTINGS[0].flag == "--max-concurrent"
    assert vars(parser.parse_args(["--max-concurrent", "3"])) == {"max_concurrent": "3"}  # text: parsed later
    assert vars(parser.parse_args([])) == {"max_concurrent": None}
    assert "in-flight calls [CXR_MAX_CONCURRENT]" in " ".join(parser.format_help().split())
    with pytest.raises(SystemExit):
        parser.parse_args(["--test-delay-s", "1"])  # environment only


def test_positive_and_non_negative_parse_with_the_given_type_and_refuse_out_of_range_text() -> None:
    assert positive(int)("4") == 4 and positive(float)("0.5") == 0.5
    assert non_negative(int)("0") == 0 and non_negative(float)("2.5") == 2.5
    with pytest.raises(ValueError, match="must be > 0, got 0"):
        positive(int)("0")
    with pytest.raises(ValueError, match="must be >= 0, got -1"):
        non_negative(float)("-1")
    with pytest.raises(ValueError):
        positive(int)("1.5")


def test_redis_urls_are_recognised_by_their_scheme() -> None:
    assert is_redis_url("redis://127.0.0.1:6390/0") and is_redis_url("rediss://h/0") and is_redis_url("unix:///s")
    assert not is_redis_url("http://127.0.0.1:6390") and not is_redis_url("127.0.0.1:6390")
