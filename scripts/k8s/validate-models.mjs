// Validates Kubernetes manifests with kubernetes-models (npm): the core kinds and, which
// kubernetes-validate (PyPI) does not know, KEDA's ScaledObject and TriggerAuthentication and
// the Prometheus Operator's ServiceMonitor. Two checks per resource:
//   - its JSON schema (kubernetes-models' validators: types, required fields, enums);
//   - its TypeScript type, by compiling each resource as an object literal of that type with
//     `tsc --strict`: a field the type does not have is an error (excess property check), which
//     the CRDs' schemas do not refuse.
//   node scripts/k8s/validate-models.mjs NODE_TOOLS_DIR FILE.yaml…
// Prints one line per resource and tsc's errors; exits 1 if any check fails or a resource is
// of a kind it has no model for.
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [tools, ...files] = process.argv.slice(2);
const modules = join(tools, "node_modules");
const load = (path) => import(pathToFileURL(join(modules, path)).href);
const yamlModule = await load("js-yaml/dist/js-yaml.mjs");
const yaml = yamlModule.loadAll ? yamlModule : yamlModule.default;
const packages = {
  "v1": "kubernetes-models/v1",
  "apps/v1": "kubernetes-models/apps/v1",
  "policy/v1": "kubernetes-models/policy/v1",
  "keda.sh/v1alpha1": "@kubernetes-models/keda/keda.sh/v1alpha1",
  "monitoring.coreos.com/v1": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
};

let failed = 0;
const imports = new Set();
const literals = [];
for (const file of files) {
  for (const doc of yaml.loadAll(readFileSync(file, "utf8"))) {
    if (doc == null) continue;
    const what = `${file}: ${doc.apiVersion} ${doc.kind} ${doc.metadata?.name}`;
    const path = packages[doc.apiVersion];
    const model = path && (await load(`${path}/index.js`))[doc.kind];
    if (!model) {
      console.log(`NO SCHEMA ${what}`);
      failed++;
      continue;
    }
    try {
      new model(doc).validate();
      console.log(`valid ${what}`);
    } catch (e) {
      console.log(`INVALID ${what}: ${e.message}`);
      failed++;
    }
    const type = `I${doc.kind}_${literals.length}`;
    imports.add(`import type { I${doc.kind} as ${type} } from "${path}";`);
    literals.push(`// ${what}\nexport const r${literals.length}: ${type} = ${JSON.stringify(doc, null, 2)};`);
  }
}

// Inside the tools' directory, so that the packages resolve.
const dir = mkdtempSync(join(tools, ".check-"));
try {
  writeFileSync(join(dir, "check.ts"), [...imports, ...literals].join("\n") + "\n");
  execFileSync(process.execPath, [
    join(modules, "typescript/bin/tsc"), "--noEmit", "--strict", "--skipLibCheck",
    "--module", "esnext", "--moduleResolution", "bundler", "--target", "es2022",
    join(dir, "check.ts"),
  ], { stdio: "pipe" });
  console.log(`types: ${literals.length} resources checked, no unknown field`);
} catch (e) {
  console.log(`TYPE ERRORS:\n${e.stdout?.toString() ?? e.message}`);
  failed++;
} finally {
  rmSync(dir, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
