// Validates Kubernetes manifests against the JSON schemas of kubernetes-models (npm): the core
// kinds and, which kubernetes-validate (PyPI) does not know, KEDA's ScaledObject and
// TriggerAuthentication and the Prometheus Operator's ServiceMonitor (their CRDs' schemas).
//   node scripts/k8s/validate-models.mjs NODE_TOOLS_DIR FILE.yaml…
// Prints one line per resource; exits 1 if any is invalid or of a kind it has no schema for.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [tools, ...files] = process.argv.slice(2);
const modules = join(tools, "node_modules");
const load = (path) => import(pathToFileURL(join(modules, path)).href);
const yamlModule = await load("js-yaml/dist/js-yaml.mjs");
const yaml = yamlModule.loadAll ? yamlModule : yamlModule.default;
const packages = {
  "v1": "kubernetes-models/v1/index.js",
  "apps/v1": "kubernetes-models/apps/v1/index.js",
  "policy/v1": "kubernetes-models/policy/v1/index.js",
  "keda.sh/v1alpha1": "@kubernetes-models/keda/keda.sh/v1alpha1/index.js",
  "monitoring.coreos.com/v1": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/index.js",
};

let failed = 0;
for (const file of files) {
  for (const doc of yaml.loadAll(readFileSync(file, "utf8"))) {
    if (doc == null) continue;
    const what = `${file}: ${doc.apiVersion} ${doc.kind} ${doc.metadata?.name}`;
    const path = packages[doc.apiVersion];
    const model = path && (await load(path))[doc.kind];
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
  }
}
process.exit(failed ? 1 : 0);
