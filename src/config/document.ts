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

/** 1-based line and column of a character offset in `text`. */
export function positionOf(text: string, offset: number): { line: number; column: number } {
  const before = text.slice(0, Math.max(0, Math.min(offset, text.length)));
  const nl = before.lastIndexOf('\n');
  return { line: before.split('\n').length, column: before.length - nl };
}

/**
 * Where JSON.parse stopped, from its message: V8 says "at position N" for
 * most errors and nothing for a truncated document. An error at or past the
 * last non-blank character means the file ended too early: it is placed
 * just after that character, not on the empty line after the final newline.
 */
function jsonError(message: string, text: string): { offset: number; truncated: boolean } {
  const end = text.trimEnd().length;
  const pos = /position (\d+)/.exec(message);
  const at = pos ? Number(pos[1]) : end;
  return at >= end ? { offset: end, truncated: true } : { offset: at, truncated: false };
}

/** JSON syntax problems, with line and column (JSON.parse's own check: JSON files must be strict JSON). */
function jsonProblems(file: string, text: string): FileProblem[] {
  try {
    JSON.parse(text);
    return [];
  } catch (e) {
    const msg = (e as Error).message;
    const { offset, truncated } = jsonError(msg, text);
    const { line, column } = positionOf(text, offset);
    const what = truncated ? 'unexpected end of file (a missing } or ]?)' : msg.replace(/ in JSON at position \d+.*$/, '').replace(/ at position \d+.*$/, '');
    return [{ file, line, message: `JSON syntax error at column ${column}: ${what}` }];
  }
}

/** First non-blank column (1-based) of a line. */
function indentColumn(text: string, line: number): number {
  const l = text.split('\n')[line - 1] ?? '';
  return l.length - l.trimStart().length + 1;
}

/**
 * The yaml parser's errors as problems on the line a reader must fix. An
 * over-indented key (`name: web` then `   port: 80`) is read as a plain
 * scalar continuing onto the next line; the parser reports it where that
 * scalar starts, one line too early, so the line is taken from where the
 * continuation ends instead.
 */
function yamlProblems(file: string, text: string, lc: LineCounter, errors: ReadonlyArray<{ code: string; pos: [number, number]; message: string }>): FileProblem[] {
  const out: FileProblem[] = [];
  const seen = new Set<string>();
  const multiline = errors.find((e) => e.code === 'MULTILINE_IMPLICIT_KEY');
  for (const err of errors) {
    let line: number;
    let message: string;
    if (multiline && (err.code === 'BLOCK_AS_IMPLICIT_KEY' || err.code === 'MULTILINE_IMPLICIT_KEY')) {
      line = lineAt(lc, multiline.pos[1]);
      message = `YAML syntax error at column ${indentColumn(text, line)}: bad indentation: this line is indented deeper than the key above it; align it with its sibling keys (or indent it under a key that ends with ":")`;
    } else if (err.code === 'BAD_INDENT' || err.code === 'MISSING_CHAR' || err.code === 'TAB_AS_INDENT' || err.code === 'UNEXPECTED_TOKEN') {
      line = lineAt(lc, err.pos[0]);
      const first = err.message.split('\n')[0]!.replace(/\s*at line \d+, column \d+:?$/, '');
      message = `YAML syntax error at column ${indentColumn(text, line)}: ${first}`;
    } else {
      const p = lc.linePos(err.pos[0]);
      line = p.line;
      message = `YAML syntax error at column ${p.col}: ${err.message.split('\n')[0]!.replace(/\s*at line \d+, column \d+:?$/, '')}`;
    }
    if (seen.has(`${line}\u0000${message}`)) continue;
    seen.add(`${line}\u0000${message}`);
    out.push({ file, line, message });
  }
  return out;
}

/** Parses `text` as JSON (by file extension) or YAML; returns the document or syntax problems. */
export function parseLocated(file: string, text: string): { doc?: LocatedDocument; problems: FileProblem[] } {
  if (file.endsWith('.json')) {
    const problems = jsonProblems(file, text);
    if (problems.length) return { problems };
  }
  const problems: FileProblem[] = [];
  const lc = new LineCounter();
  const doc: Document = parseDocument(text, { lineCounter: lc, uniqueKeys: true, prettyErrors: false });
  problems.push(...yamlProblems(file, text, lc, doc.errors));
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

/** A value as a message shows it: short, and typed where JSON would hide the type. */
function shown(v: unknown): string {
  if (typeof v === 'string') return `the string ${JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}...` : v)}`;
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'a list';
  if (typeof v === 'object') return 'a map';
  return `${typeof v} ${JSON.stringify(v) ?? typeof v}`;
}

/**
 * A schema may carry `x-hint`: the message for a `pattern`/`const` failure,
 * in words the user knows (Ajv itself would print the regular expression).
 */
type Annotated = { 'x-hint'?: string; minimum?: number; maximum?: number };

function describeAjv(e: ErrorObject): { extraKey?: string; message: string } {
  const schema = (e.parentSchema ?? {}) as Annotated;
  switch (e.keyword) {
    case 'additionalProperties': {
      const key = (e.params as { additionalProperty: string }).additionalProperty;
      return { extraKey: key, message: `unknown field "${key}"` };
    }
    case 'required':
      return { message: `missing required field "${(e.params as { missingProperty: string }).missingProperty}"` };
    case 'type':
      return { message: `must be ${(e.params as { type: string }).type}, not ${shown(e.data)}` };
    case 'minimum':
    case 'maximum': {
      const { limit } = e.params as { limit: number };
      // Every bounded integer in knit's files is a port except where the schema says otherwise.
      return { message: schema.maximum === 65535 ? `must be a port number from ${schema.minimum ?? 0} to 65535 (port out of range)` : `must be ${e.keyword === 'minimum' ? '>=' : '<='} ${limit}` };
    }
    case 'enum':
      return { message: `must be ${(e.params as { allowedValues: unknown[] }).allowedValues.map((v) => JSON.stringify(v)).join(' or ')}` };
    case 'const':
      return { message: schema['x-hint'] ?? `must be ${JSON.stringify((e.params as { allowedValue: unknown }).allowedValue)}` };
    case 'pattern':
      return { message: schema['x-hint'] ?? e.message ?? 'has the wrong form' };
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
