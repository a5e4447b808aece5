"""Small pieces every stage uses: errors, command-line parsing and checks, atomic files, prompt rules, images,
and how a command ends."""
