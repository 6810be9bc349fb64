import re, sys
# Keeps a file's top-level items except those named (a "use" line counts by the crate it names).
path, drop = sys.argv[1], set(sys.argv[2:])
lines = open(path).read().split('\n')
items, i, pending = [], 0, []
while i < len(lines):
    l = lines[i]
    if l.startswith('///') or l.startswith('#['):
        pending.append(l); i += 1; continue
    m = re.match(r'^(?:pub(?:\([a-z]+\))? )?(?:fn|struct|enum|impl|use|mod|const|thread_local!)\s*([A-Za-z_][A-Za-z0-9_]*)?', l)
    if m and l[0] != ' ':
        name = m.group(1) or ''
        j = i
        if not (l.rstrip().endswith(';')):
            while not (lines[j].startswith('}')):
                j += 1
        items.append((name, pending + lines[i:j+1])); pending = []; i = j + 1; continue
    items.append(('', pending + [l])); pending = []; i += 1
out = []
for name, body in items:
    if name in drop: continue
    out += body
open(path, 'w').write('\n'.join(out))
