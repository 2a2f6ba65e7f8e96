/** `knit validate DIR_OR_FILE`: every problem in service and intention files, with file, line and field. */
import { readFile, stat } from 'node:fs/promises';
import { listServiceFiles, parseServiceFiles, type LoadOptions } from '../config/services.js';
import { parseIntentionsFile } from '../config/intentions-file.js';
import { parseLocated } from '../config/document.js';
import { ConfigError, formatProblem, type FileProblem } from '../errors.js';

export interface ValidateResult {
  files: string[];
  services: string[];
  intentionFiles: string[];
  problems: FileProblem[];
  warnings: FileProblem[];
}

/** An intentions file is one whose top level has `intentions`; everything else is a service file. */
function isIntentionsFile(file: string, text: string): boolean {
  const { doc } = parseLocated(file, text);
  const v = doc?.value;
  return typeof v === 'object' && v !== null && 'intentions' in v;
}

export async function validate(target: string, opts: LoadOptions = {}): Promise<ValidateResult> {
  let files: string[];
  try {
    files = (await stat(target)).isDirectory() ? await listServiceFiles(target) : [target];
  } catch (e) {
    return { files: [], services: [], intentionFiles: [], problems: [{ file: target, message: (e as Error).message }], warnings: [] };
  }
  const texts = await Promise.all(files.map(async (file) => ({ file, text: await readFile(file, 'utf8') })));
  const out: ValidateResult = { files, services: [], intentionFiles: [], problems: [], warnings: [] };
  const serviceFiles = [];
  for (const t of texts) {
    if (!isIntentionsFile(t.file, t.text)) {
      serviceFiles.push(t);
      continue;
    }
    out.intentionFiles.push(t.file);
    try {
      parseIntentionsFile(t.file, t.text);
    } catch (e) {
      if (e instanceof ConfigError) out.problems.push(...e.problems);
      else throw e;
    }
  }
  const r = parseServiceFiles(serviceFiles, opts);
  out.services = r.services.map((s) => s.id);
  out.problems.push(...r.problems);
  out.warnings = r.warnings;
  return out;
}

export function printValidate(r: ValidateResult, json: boolean): number {
  if (json) {
    console.log(JSON.stringify(r, null, 1));
  } else {
    for (const w of r.warnings) console.error(`warning: ${formatProblem(w)}`);
    for (const p of r.problems) console.error(formatProblem(p));
    if (r.problems.length) console.error(`${r.problems.length} problem(s) in ${r.files.length} file(s)`);
    else console.log(`ok: ${r.files.length} file(s), ${r.services.length} service(s), ${r.intentionFiles.length} intentions file(s)`);
  }
  return r.problems.length ? 1 : 0;
}
