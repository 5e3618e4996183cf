"""The web UI in a real browser: headless Chromium (Debian's chromium and chromedriver), driven
by Selenium, against `kura serve` in token mode with an admin and a reader account, holding the
shared redis image pushed by skopeo. The browser signs in, browses to redis, opens a tag, sees its
layers, is refused a delete as the reader and deletes a tag as the admin. Screenshots are saved
in the test's temp dir (docs/ui-repositories.png and docs/ui-image.png are two of them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from registry.auth import htpasswd
from tests.support.paths import IMAGES, require_shared
from tests.support.servers import Server, start_kura, stop

pytestmark = pytest.mark.e2e

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PASSWORDS = {"admin": "admin-password-1", "reader": "reader-password-2"}
CONFIG = """
[auth]
mode = "token"

[[auth.rules]]
repositories = ["**"]
users = ["admin"]
actions = ["*"]

[[auth.rules]]
repositories = ["**"]
users = ["reader"]
actions = ["pull"]
"""
WAIT_SECONDS = 30  # a bound on each wait for the browser, not a speed asserted


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    require_shared()
    workdir = tmp_path_factory.mktemp("ui-browser")
    root = workdir / "data"
    for user, password in PASSWORDS.items():
        htpasswd.set_user(root / "auth" / "htpasswd", user, password, cost=4)
    (workdir / "kura.toml").write_text(CONFIG)
    server = start_kura(root, None, "--config", str(workdir / "kura.toml"))
    try:
        creds = f"admin:{PASSWORDS['admin']}"
        for source, target in ((f"oci:{IMAGES / 'redis'}:7", "library/redis:7"),
                               (f"oci:{IMAGES / 'redis'}:latest", "library/redis:latest"),
                               (f"oci:{IMAGES / 'debian'}:bookworm", "library/debian:bookworm"),
                               (f"oci:{IMAGES / 'busybox-multiarch'}:latest", "tools/busybox:1")):
            done = subprocess.run(["skopeo", "copy", "--all", "--dest-tls-verify=false", "--dest-creds", creds,
                                   source, f"docker://{server.host}/{target}"],
                                  capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
            assert done.returncode == 0, done.stderr.decode(errors="replace")
        yield server
    finally:
        stop(server)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        assert os.access(path, os.X_OK), f"{path} is missing: apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


class Session:
    """One browser's walk through the UI, with a screenshot at each step."""

    def __init__(self, driver, server: Server, shots: Path):
        self.driver, self.server, self.shots = driver, server, shots
        shots.mkdir(exist_ok=True)

    def wait(self, condition):
        from selenium.webdriver.support.ui import WebDriverWait
        return WebDriverWait(self.driver, WAIT_SECONDS).until(condition)

    def find(self, css: str):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        return self.wait(ec.presence_of_element_located((By.CSS_SELECTOR, css)))

    def all(self, css: str):
        from selenium.webdriver.common.by import By
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def link(self, text: str):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        return self.wait(ec.element_to_be_clickable((By.LINK_TEXT, text)))

    def open(self, path: str) -> None:
        self.driver.get(self.server.url + path)

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        assert self.driver.save_screenshot(str(path))
        return path

    def sign_in(self, user: str) -> None:
        self.open("/ui/")
        self.find("#sign-in").click()
        self.find("#username").send_keys(user)
        self.find("#password").send_keys(PASSWORDS[user])
        self.find("#submit").click()
        assert self.find("#signed-in").text == user

    def sign_out(self) -> None:
        self.find("#sign-out").click()
        self.find("#sign-in")


def manifest_status(server: Server, reference: str) -> int:
    """What the registry answers the admin for library/redis:<reference>."""
    import base64
    import json
    basic = base64.b64encode(f"admin:{PASSWORDS['admin']}".encode()).decode()
    request = urllib.request.Request(f"{server.url}/auth/token?service=kura&scope=repository:library/redis:pull",
                                     headers={"Authorization": f"Basic {basic}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        token = json.loads(response.read())["token"]
    request = urllib.request.Request(f"{server.url}/v2/library/redis/manifests/{reference}", method="HEAD",
                                     headers={"Authorization": f"Bearer {token}",
                                              "Accept": "application/vnd.oci.image.manifest.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_browse_sign_in_and_delete_in_chromium(registry, browser, tmp_path):
    ui = Session(browser, registry, tmp_path / "screenshots")
    ui.open("/ui/")
    assert "No repositories you may see without signing in" in ui.find("main").text
    ui.shot("anonymous")

    # The reader browses to redis and its layers.
    ui.sign_in("reader")
    names = [a.text for a in ui.all("#repositories tbody td:first-child a")]
    assert names == ["library/debian", "library/redis", "tools/busybox"]
    ui.find("#search").send_keys("red\n")
    ui.wait(lambda d: [a.text for a in ui.all("#repositories tbody td:first-child a")] == ["library/redis"])
    ui.open("/ui/")
    ui.find("#repositories")
    repositories_shot = ui.shot("repositories")
    ui.link("library/redis").click()
    assert [a.text for a in ui.all("#tags a.tag")] == ["7", "latest"]
    assert not ui.all("#tags button.danger")  # a reader gets no delete buttons
    ui.shot("tags")
    ui.link("7").click()
    layers = ui.find("#layers").find_elements("css selector", "tbody tr")
    assert len(layers) == 4 and all("MiB" in row.text or "KiB" in row.text or " B" in row.text for row in layers)
    assert '["redis-server"]' in ui.find("#cmd").text
    assert ui.find("#pull-1").text.startswith(f"docker pull {registry.host}/library/redis:7")
    button = ui.find("button.copy-button")
    button.click()
    ui.wait(lambda d: button.text != "Copy")  # the script ran: "Copied" (or its fallback's word)
    browser.set_window_size(1280, 1700)  # the whole page: config, layers, history
    image_shot = ui.shot("image")
    browser.set_window_size(1280, 1000)
    assert not ui.all("#delete-tag")
    # The reader posts the delete form anyway (with their own valid form token): refused.
    browser.execute_script("""
        const form = document.createElement("form");
        form.method = "post"; form.action = "/ui/r/library/redis/-/delete";
        for (const [name, value] of [["tag", "7"], ["csrf", document.querySelector('meta[name="kura-csrf"]').content]]) {
            const input = document.createElement("input"); input.type = "hidden"; input.name = name; input.value = value;
            form.appendChild(input);
        }
        document.body.appendChild(form); form.submit();""")
    assert "You may not delete tags of library/redis" in ui.find("#error").text
    ui.shot("refused")
    assert manifest_status(registry, "7") == 200
    ui.open("/ui/")
    ui.sign_out()

    # The admin deletes the tag `latest`.
    ui.sign_in("admin")
    ui.open("/ui/r/library/redis")
    ui.find("#delete-latest").click()
    ui.wait(lambda d: _alert(d)).accept()
    assert ui.find("#deleted").text == "Deleted tag latest."
    assert [a.text for a in ui.all("#tags a.tag")] == ["7"]
    ui.shot("deleted")
    assert manifest_status(registry, "latest") == 404 and manifest_status(registry, "7") == 200

    docs = os.environ.get("KURA_UI_SCREENSHOTS")  # set to docs/ to refresh the README's pictures
    if docs:
        shutil.copy(repositories_shot, Path(docs) / "ui-repositories.png")
        shutil.copy(image_shot, Path(docs) / "ui-image.png")


def _alert(driver):
    from selenium.common.exceptions import NoAlertPresentException
    try:
        return driver.switch_to.alert
    except NoAlertPresentException:
        return False
