// Run by crates/ws/tests/browser.rs in headless Chromium: connects to the hub named in the page's
// query (?hub=ws://…&token=…), exercises the client, and reports the outcome to the hub with a
// `report` request, which the Rust test checks.
import { connect, topicMatches } from "/hivewire.js";

const log = (s) => {
  document.getElementById("log").textContent += s + "\n";
  console.log(s);
};
const params = new URLSearchParams(location.search);
const hubUrl = params.get("hub");
const token = params.get("token") ?? undefined;
const result = { ok: false, steps: [] };
let hw;
try {
  hw = await connect(hubUrl, { agentId: "browser", token, metadata: { ua: navigator.userAgent.slice(0, 60) } });
  result.steps.push("handshake");
  result.hub = hw.hubId;
  log("connected to " + hw.hubId);

  // A request with a timeout, answered by the hub's echo.
  const echo = await hw.request("hub", "echo", { n: 42, s: "héllo", list: [1, 2, 3] }, { timeoutMs: 5000 });
  result.echo = echo;
  result.steps.push("echo");

  // A request nobody answers in time fails with a timeout.
  try {
    await hw.request("hub", "never-answered", null, { timeoutMs: 200 });
    result.timeout = "no error";
  } catch (e) {
    result.timeout = String(e.message).includes("timed out") ? "timed out" : String(e.message);
  }
  result.steps.push("timeout");

  // Subscribe, then ask the hub to publish on a matching topic.
  const event = new Promise((resolve) => hw.subscribe("news.*", (value, msg) => resolve({ topic: msg.topic, value })));
  await hw.request("hub", "publish", { topic: "news.today", value: { headline: "hello browser" } }, { timeoutMs: 5000 });
  result.event = await Promise.race([event, new Promise((_, rej) => setTimeout(() => rej(new Error("no event")), 5000))]);
  result.steps.push("event");

  // The hub calls the browser back.
  hw.onRequest = async (method, value) => ({ method, doubled: value * 2 });
  result.callback = await hw.request("hub", "call-me-back", 21, { timeoutMs: 5000 });
  result.steps.push("callback");

  result.matcher = [topicMatches("a.*", "a.b"), topicMatches("a.**", "a.b.c"), topicMatches("a.*", "a.b.c")];
  result.ok = true;
} catch (e) {
  result.error = String(e && e.stack ? e.stack : e);
  log("error: " + result.error);
}
try {
  await hw.request("hub", "report", result, { timeoutMs: 5000 });
  log("reported");
} catch (e) {
  log("could not report: " + e);
}
