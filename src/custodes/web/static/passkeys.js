// Passkeys (WebAuthn): fetch the server's options, call navigator.credentials.create or
// .get, and post the answer with the form's token. base64url <-> ArrayBuffer both ways.
// Without this file (or without WebAuthn) the pages work as before with the one-time code.
(function () {
  "use strict";

  function toBuffer(text) {
    var b64 = text.replace(/-/g, "+").replace(/_/g, "/");
    b64 += "===".slice((b64.length + 3) % 4);
    var bin = atob(b64);
    var out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out.buffer;
  }

  function toText(buffer) {
    var bytes = new Uint8Array(buffer);
    var bin = "";
    for (var i = 0; i < bytes.length; i++) bin += String.fromCharCode(bytes[i]);
    return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function descriptors(list) {
    return (list || []).map(function (c) {
      return { type: c.type, id: toBuffer(c.id), transports: c.transports };
    });
  }

  // POST the named fields of a form (its token among them); the JSON answer.
  function options(url, form, names) {
    var body = new URLSearchParams();
    names.forEach(function (name) { body.append(name, form.elements[name].value); });
    return fetch(url, { method: "POST", body: body, credentials: "same-origin" }).then(
      function (response) {
        if (!response.ok) throw new Error("the server refused");
        return response.json();
      }
    );
  }

  function say(status, text) {
    status.hidden = false;
    status.textContent = text;
  }

  // A PublicKeyCredential as JSON (the WebAuthn JSON form py_webauthn reads), around
  // the ceremony's own response fields.
  function asJson(credential, response) {
    return JSON.stringify({
      id: credential.id,
      rawId: toText(credential.rawId),
      type: credential.type,
      authenticatorAttachment: credential.authenticatorAttachment || undefined,
      response: response,
      clientExtensionResults: credential.getClientExtensionResults(),
    });
  }

  function registration(credential) {
    var r = credential.response;
    return asJson(credential, {
      clientDataJSON: toText(r.clientDataJSON),
      attestationObject: toText(r.attestationObject),
      transports: r.getTransports ? r.getTransports() : [],
    });
  }

  function assertion(credential) {
    var r = credential.response;
    return asJson(credential, {
      clientDataJSON: toText(r.clientDataJSON),
      authenticatorData: toText(r.authenticatorData),
      signature: toText(r.signature),
      userHandle: r.userHandle ? toText(r.userHandle) : null,
    });
  }

  function setUpRegistration(form) {
    var button = document.getElementById("add-passkey");
    var status = document.getElementById("passkey-status");
    button.hidden = false;
    status.textContent = "";
    button.addEventListener("click", function () {
      button.disabled = true;
      say(status, "Follow your browser's prompt to create the passkey.");
      options(form.dataset.options, form, ["csrf_token"])
        .then(function (o) {
          o.challenge = toBuffer(o.challenge);
          o.user.id = toBuffer(o.user.id);
          o.excludeCredentials = descriptors(o.excludeCredentials);
          return navigator.credentials.create({ publicKey: o });
        })
        .then(function (credential) {
          form.elements.credential.value = registration(credential);
          form.submit();
        })
        .catch(function () {
          button.disabled = false;
          say(status, "No passkey was added. Try again, or keep using the authenticator app.");
        });
    });
  }

  function setUpLogin(form) {
    var button = document.getElementById("use-passkey");
    var status = document.getElementById("passkey-status");
    var code = form.elements.totp;
    button.hidden = false;
    button.addEventListener("click", function () {
      if (!form.elements.username.reportValidity() || !form.elements.password.reportValidity()) {
        return;
      }
      button.disabled = true;
      say(status, "Follow your browser's prompt to use your passkey.");
      options(form.dataset.passkeyOptions, form, ["username", "form_token"])
        .then(function (o) {
          o.challenge = toBuffer(o.challenge);
          o.allowCredentials = descriptors(o.allowCredentials);
          return navigator.credentials.get({ publicKey: o });
        })
        .then(function (credential) {
          form.elements.passkey.value = assertion(credential);
          code.required = false;
          code.value = "";
          form.submit();
        })
        .catch(function () {
          button.disabled = false;
          say(status, "The passkey was not used. Enter the one-time code instead.");
        });
    });
  }

  function start() {
    if (!window.PublicKeyCredential || !navigator.credentials) return;
    var register = document.getElementById("passkey-register");
    if (register) setUpRegistration(register);
    var login = document.getElementById("login-form");
    if (login) setUpLogin(login);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
