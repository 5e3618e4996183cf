"""Driver contract: the readiness probe (GET /readyz) writes, reads back and deletes a small
object in the temp area, and leaves nothing behind (run once per flavour, see flavours.py)."""

import time


async def test_the_probe_passes_and_leaves_nothing_in_the_temp_area(driver):
    await driver.probe()
    await driver.probe()
    assert await driver.purge_temp(time.time() + 3600) == 0  # every temp entry would count
