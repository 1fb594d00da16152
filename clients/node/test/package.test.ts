/** The package pins every dependency exactly, and its lockfile and node_modules hold those pins. */

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import { ROOT } from "./support/prefd.js";

const PACKAGE = join(ROOT, "clients", "node");

function json(path: string): Record<string, unknown> {
  return JSON.parse(readFileSync(join(PACKAGE, path), "utf8")) as Record<string, unknown>;
}

test("every dependency is pinned exactly, in package.json, the lockfile and node_modules", () => {
  const manifest = json("package.json") as { dependencies: Record<string, string>; devDependencies: Record<string, string> };
  const lock = json("package-lock.json") as { packages: Record<string, { version: string }> };
  const pins = { ...manifest.dependencies, ...manifest.devDependencies };
  assert.ok(Object.keys(pins).includes("@bufbuild/protoc-gen-es"));
  for (const [name, version] of Object.entries(pins)) {
    assert.match(version, /^\d+\.\d+\.\d+$/, `${name}@${version} is not an exact version`);
    assert.equal(lock.packages[`node_modules/${name}`]?.version, version, `the lockfile's ${name}`);
    assert.equal(json(join("node_modules", name, "package.json")).version, version, `the installed ${name} (run npm ci)`);
  }
});
