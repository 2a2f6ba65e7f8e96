/**
 * `knit validate DIR_OR_FILE`: every problem in service files, intention
 * files and agent/server configs, with file, line and field; the same
 * checks the agent and server run when they load them.
 */
import { readFile, stat } from 'node:fs/promises';
import { listServiceFiles, parseServiceFiles, type LoadOptions } from '../config/services.js';
import { parseIntentionsFile } from '../config/intentions-file.js';
import { nodeConfigKind, parseAgentConfig, parseServerConfig } from '../config/node-config.js';
import { parseLocated } from '../config/document.js';
import { ConfigError, formatProblem, type FileProblem } from '../errors.js';

/** What `knit validate` found: the files by kind, every problem, every warning. */
export interface ValidateResult {
  files: string[];
  services: string[];
  intentionFiles: string[];
  /** agent.yaml / server.yaml files found among the targets. */
  configFiles: string[];
  problems: FileProblem[];
  warnings: FileProblem[];
}

/** What a file is, by its top level: `intentions` makes an intentions file, `registry` a node config, anything else a service file. */
function kindOf(file: string, text: string): 'intentions' | 'agent' | 'server' | 'services' {
  const { doc } = parseLocated(file, text);
  const v = doc?.value;
  if (typeof v === 'object' && v !== null && 'intentions' in v) return 'intentions';
  return nodeConfigKind(v) ?? 'services';
}

/** Checks a file or every `*.json|*.yaml|*.yml` directly in a directory; a directory with none is a problem. */
export async function validate(target: string, opts: LoadOptions = {}): Promise<ValidateResult> {
  const out: ValidateResult = { files: [], services: [], intentionFiles: [], configFiles: [], problems: [], warnings: [] };
  let files: string[];
  try {
    files = (await stat(target)).isDirectory() ? await listServiceFiles(target) : [target];
  } catch (e) {
    out.problems.push({ file: target, message: (e as Error).message });
    return out;
  }
  if (files.length === 0) {
    out.problems.push({ file: target, message: 'no service, intention or config files here (*.json, *.yaml, *.yml directly in the directory): nothing to validate' });
    return out;
  }
  out.files = files;
  const texts = await Promise.all(files.map(async (file) => ({ file, text: await readFile(file, 'utf8') })));
  const serviceFiles = [];
  for (const t of texts) {
    const kind = kindOf(t.file, t.text);
    if (kind === 'services') {
      serviceFiles.push(t);
    } else if (kind === 'intentions') {
      out.intentionFiles.push(t.file);
      try {
        parseIntentionsFile(t.file, t.text);
      } catch (e) {
        if (e instanceof ConfigError) out.problems.push(...e.problems);
        else throw e;
      }
    } else {
      out.configFiles.push(t.file);
      out.problems.push(...(kind === 'agent' ? parseAgentConfig(t.file, t.text) : parseServerConfig(t.file, t.text)).problems);
    }
  }
  const r = parseServiceFiles(serviceFiles, opts);
  out.services = r.services.map((s) => s.id);
  out.problems.push(...r.problems);
  out.warnings = r.warnings;
  // In the order of the files, then of their lines: the order an editor walks them.
  const order = (p: FileProblem): [number, number] => [files.indexOf(p.file), p.line ?? 0];
  const byPlace = (a: FileProblem, b: FileProblem): number => {
    const [fa, la] = order(a);
    const [fb, lb] = order(b);
    return fa - fb || la - lb;
  };
  out.problems.sort(byPlace);
  out.warnings.sort(byPlace);
  return out;
}

/** Prints a result (JSON, or warnings and problems as `file:line: field: message`); returns the exit status. */
export function printValidate(r: ValidateResult, json: boolean): number {
  if (json) {
    console.log(JSON.stringify(r, null, 1));
  } else {
    for (const w of r.warnings) console.error(`warning: ${formatProblem(w)}`);
    for (const p of r.problems) console.error(formatProblem(p));
    if (r.problems.length) {
      if (r.files.length) console.error(`${r.problems.length} problem(s) in ${r.files.length} file(s)`);
    } else console.log(`ok: ${r.files.length} file(s), ${r.services.length} service(s), ${r.intentionFiles.length} intentions file(s)${r.configFiles.length ? `, ${r.configFiles.length} agent/server config(s)` : ''}`);
  }
  return r.problems.length ? 1 : 0;
}
