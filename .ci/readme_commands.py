"""Print the README's two shell commands, install-and-demo first, then install-and-test.

CI runs them verbatim so that what a new user types is what is tested: each is the single line
of a fenced bash block in README.md that starts with `pip install torch`. Exits non-zero when
there are not exactly two, so a README edit cannot silently drop one from CI.
"""
import re
import sys


def main(path: str) -> int:
    text = open(path, encoding="utf-8").read()
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    commands = [block.strip() for block in blocks if block.strip().startswith("pip install torch")]
    if len(commands) != 2 or any("\n" in command for command in commands):
        print(f"{path}: expected two one-line bash blocks starting with 'pip install torch', found {commands}",
              file=sys.stderr)
        return 1
    print("\n".join(commands))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
