"""The tag list's `Link` header: the page to follow is the one with rel="next", wherever it is."""

import pytest

from puller.remote import _next_page


@pytest.mark.parametrize("header, expected", [
    ('</v2/a/tags/list?n=2&last=b>; rel="next"', "/v2/a/tags/list?n=2&last=b"),
    ('</v2/a/tags/list?last=a>; rel="prev", </v2/a/tags/list?last=c>; rel="next"', "/v2/a/tags/list?last=c"),
    ('</v2/a/tags/list?last=c>; type="x"; rel=next', "/v2/a/tags/list?last=c"),
    ('</v2/a/tags/list?last=a>; rel="prev"', None),
    ('', None),
])
def test_next_page_is_the_rel_next_target(header, expected):
    assert _next_page(header) == expected
