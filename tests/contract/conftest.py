"""Fixtures of the driver contract suite: every test here runs once per flavour (flavours.py)."""

import pytest

from .flavours import FLAVOURS


@pytest.fixture(params=[pytest.param(name, marks=kind.marks) for name, kind in FLAVOURS.items()])
def flavour(request, tmp_path):
    kind = FLAVOURS[request.param]
    return kind(tmp_path, **{name: request.getfixturevalue(name) for name in kind.fixtures})


@pytest.fixture
async def driver_factory(flavour):
    """`await driver_factory()`: a driver over a fresh, empty store;
    `await driver_factory(shared_with=d)`: another driver over d's store (another process).
    Every driver it gave is closed after the test."""
    opened = []

    async def factory(*, shared_with=None):
        driver = await flavour.open(shared_with)
        opened.append(driver)
        return driver

    yield factory
    for driver in reversed(opened):
        await driver.close()
    await flavour.cleanup()


@pytest.fixture
async def driver(driver_factory):
    return await driver_factory()


@pytest.fixture
async def other(driver, driver_factory):
    """A second driver over `driver`'s store, as another `kura serve` or `kura gc` has."""
    return await driver_factory(shared_with=driver)
