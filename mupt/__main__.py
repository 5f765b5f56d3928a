from mupt.cli import main

main()
