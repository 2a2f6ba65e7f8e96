/**
 * Reading JSON and YAML files so that every later problem can be reported
 * with the line it sits on. JSON is checked with JSON.parse first (so a JSON
 * file must be strict JSON), then both formats are read with the `yaml`
 * parser, which keeps source ranges and also catches duplicate keys that
 * JSON.parse would silently drop.
 */
import { parseDocument, LineCounter, isMap, isNode, isPair, isScalar, type Document, type Node } from 'yaml';
import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';
import type { FileProblem } from '../errors.js';

/** The one schema compiler for knit's files (verbose: errors carry their schema, for messages). */
export const ajv = new Ajv({ allErrors: true, strict: false, verbose: true });

/** A parsed file that can say where a field is. */
export interface LocatedDocument {
  file: string;
  value: unknown;
  /** 1-based line of the value at `path`, or of its nearest existing parent. */
  lineOf(path: ReadonlyArray<string | number>): number | undefined;
  /** 1-based line of the key `key` inside the map at `path`. */
  lineOfKey(path: ReadonlyArray<string | number>, key: string): number | undefined;
}

function lineAt(lc: LineCounter, offset: number): number {
  return lc.linePos(offset).line;
}

/** Parses `text` as JSON (by file extension) or YAML; returns the document or syntax problems. */
export function parseLocated(file: string, text: string): { doc?: LocatedDocument; problems: FileProblem[] } {
  const problems: FileProblem[] = [];
  if (file.endsWith('.json')) {
    try {
      JSON.parse(text);
    } catch (e) {
      const msg = (e as Error).message;
      const pos = /position (\d+)/.exec(msg);
      const line = pos ? text.slice(0, Number(pos[1])).split('\n').length : undefined;
      problems.push({ file, line, message: `JSON syntax error: ${msg.replace(/ at position \d+.*$/, '')}` });
      return { problems };
    }
  }
  const lc = new LineCounter();
  const doc: Document = parseDocument(text, { lineCounter: lc, uniqueKeys: true, prettyErrors: false });
  for (const err of doc.errors) {
    problems.push({ file, line: lineAt(lc, err.pos[0]), message: `syntax error: ${err.message.split('\n')[0]}` });
  }
  if (problems.length) return { problems };

  const nodeAt = (path: ReadonlyArray<string | number>): Node | undefined => {
    for (let n = path.length; n >= 0; n--) {
      const got: unknown = n === 0 ? doc.contents : doc.getIn(path.slice(0, n), true);
      if (isNode(got)) return got;
    }
    return undefined;
  };
  return {
    problems,
    doc: {
      file,
      value: doc.toJS(),
      lineOf(path) {
        const n = nodeAt(path);
        return n?.range ? lineAt(lc, n.range[0]) : undefined;
      },
      lineOfKey(path, key) {
        const parent = nodeAt(path);
        if (isMap(parent)) {
          for (const pair of parent.items) {
            if (isPair(pair) && isScalar(pair.key) && pair.key.value === key && pair.key.range) {
              return lineAt(lc, pair.key.range[0]);
            }
          }
        }
        return this.lineOf(path);
      },
    },
  };
}

/** `a.b[0].c` from `['a','b',0,'c']`. */
export function fieldPath(path: ReadonlyArray<string | number>): string {
  let out = '';
  for (const p of path) out += typeof p === 'number' ? `[${p}]` : out ? `.${p}` : p;
  return out;
}

/** Splits an Ajv instancePath (`/a/b/0`) into segments, numbers for array indexes. */
export function splitPointer(pointer: string, value: unknown): Array<string | number> {
  if (!pointer) return [];
  const out: Array<string | number> = [];
  let cur: unknown = value;
  for (const raw of pointer.slice(1).split('/')) {
    const seg = raw.replace(/~1/g, '/').replace(/~0/g, '~');
    const idx = Array.isArray(cur) && /^\d+$/.test(seg) ? Number(seg) : seg;
    out.push(idx);
    cur = cur !== null && typeof cur === 'object' ? (cur as Record<string | number, unknown>)[idx] : undefined;
  }
  return out;
}

function describeAjv(e: ErrorObject): { extraKey?: string; message: string } {
  switch (e.keyword) {
    case 'additionalProperties': {
      const key = (e.params as { additionalProperty: string }).additionalProperty;
      return { extraKey: key, message: `unknown field "${key}"` };
    }
    case 'required':
      return { message: `missing required field "${(e.params as { missingProperty: string }).missingProperty}"` };
    case 'type':
      return { message: `must be ${(e.params as { type: string }).type}` };
    case 'minimum':
    case 'maximum': {
      const { limit } = e.params as { limit: number };
      // Every bounded integer in knit's files is a port except where the schema says otherwise.
      return { message: e.parentSchema && (e.parentSchema as { maximum?: number }).maximum === 65535 ? 'must be an integer from 1 to 65535 (port out of range)' : `must be ${e.keyword === 'minimum' ? '>=' : '<='} ${limit}` };
    }
    case 'enum':
      return { message: `must be ${(e.params as { allowedValues: unknown[] }).allowedValues.map((v) => JSON.stringify(v)).join(' or ')}` };
    case 'minProperties':
    case 'maxProperties':
      return e.instancePath === '' ? { message: 'a service file holds exactly one of "service" or "services"' } : { message: `at most 64 meta pairs` };
    default:
      return { message: e.message ?? e.keyword };
  }
}

/** Problems a compiled schema finds in a document, one per distinct field and message, located. */
export function schemaProblems(doc: LocatedDocument, validate: ValidateFunction): FileProblem[] {
  if (validate(doc.value)) return [];
  const seen = new Set<string>();
  const out: FileProblem[] = [];
  for (const e of validate.errors ?? []) {
    const path = splitPointer(e.instancePath, doc.value);
    const { extraKey, message } = describeAjv(e);
    const full = extraKey !== undefined ? [...path, extraKey] : path;
    const field = fieldPath(full) || '(top level)';
    const k = `${field}\u0000${message}`;
    if (seen.has(k)) continue;
    seen.add(k);
    const line = extraKey !== undefined ? doc.lineOfKey(path, extraKey) : doc.lineOf(path);
    out.push({ file: doc.file, line, field, message });
  }
  return out;
}
