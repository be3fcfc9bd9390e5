from layerkv.cli import main

main()
