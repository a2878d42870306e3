from distckpt.cli import main

main()
