"""Push a pruned model to the Hugging Face Hub, with its model card (or, with --dry-run, show what would go).

    python examples/prune_minilm.py --output spdy-minilm-1.5x
    python examples/push_to_hub.py spdy-minilm-1.5x me/all-MiniLM-L6-v2-spdy-1.5x            # needs `hf auth login`
    python examples/push_to_hub.py spdy-minilm-1.5x me/all-MiniLM-L6-v2-spdy-1.5x --dry-run  # offline

The same from the command line: `spdy-hf push DIR REPO`, or `spdy-hf prune ... --push-to-hub REPO`.
"""

import argparse
import logging
import os

from spdy_hf.integrations.hub import CARD_FILE, push_folder, write_card


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="A directory written by spdy-hf prune / save_pretrained.")
    parser.add_argument("repo", help="Hub repo id, e.g. me/all-MiniLM-L6-v2-spdy-1.5x.")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="Write the model card and list the files only.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    if args.dry_run:
        write_card(args.directory)
        print(f"Would upload to {args.repo}:")
        for name in sorted(os.listdir(args.directory)):
            print(f"  {name}  ({os.path.getsize(os.path.join(args.directory, name))} bytes)")
        print(f"Model card: {os.path.join(args.directory, CARD_FILE)}")
        return
    print(push_folder(args.directory, args.repo, private=args.private or None))


if __name__ == "__main__":
    main()
