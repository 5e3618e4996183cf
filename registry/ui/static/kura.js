// Kura web UI: copy buttons and delete confirmations; every page works without it.
"use strict";

function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    return navigator.clipboard.writeText(text);
  }
  // Plain HTTP on another host than localhost has no clipboard API: the old way.
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.appendChild(area);
  area.select();
  const done = document.execCommand("copy");
  document.body.removeChild(area);
  return done ? Promise.resolve() : Promise.reject(new Error("copy refused"));
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button.copy-button");
  if (!button) return;
  copyText(button.dataset.copy).then(() => {
    button.textContent = "Copied";
    button.classList.add("copied");
    setTimeout(() => { button.textContent = "Copy"; button.classList.remove("copied"); }, 1500);
  }, () => { button.textContent = "Select and copy"; });
});

document.addEventListener("submit", (event) => {
  const question = event.target.dataset.confirm;
  const tag = event.submitter && event.submitter.name === "tag" ? event.submitter.value : "";
  if (question && !window.confirm(question.replace("{tag}", tag))) event.preventDefault();
});
